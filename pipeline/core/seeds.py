"""Seed derivation: independent, reproducible random streams for users, images and stages."""

from __future__ import annotations

import numpy as np


def child_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys: independent streams for users and images."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))
