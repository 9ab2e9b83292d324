"""Shared fixtures: small deterministic data that every test can afford."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def repo() -> Path:
    return REPO
