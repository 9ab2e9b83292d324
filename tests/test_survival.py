"""Mark survival: lossless storage keeps the mark, JPEG weakens its noise part."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MarkConfig
from pipeline.core.marking import mark_batch, stripe_pattern
from pipeline.core.survival import jpeg_roundtrip, summarise_survival, survival_correlations

SIZE = 32
SEEDS = np.arange(4, dtype=np.uint64)


@pytest.fixture
def originals() -> np.ndarray:
    """Smooth mid-grey colour ramps, so clipping does not eat the noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rng = np.random.default_rng(0)
    ramps = [60 + 120 * (a * xx + (1 - a) * yy)[..., None] * rng.uniform(0.5, 1.0, 3) for a in rng.uniform(0, 1, 4)]
    return np.rint(np.stack(ramps)).astype(np.uint8)


def _survival(originals: np.ndarray, cfg: MarkConfig) -> dict:
    pattern = stripe_pattern(3, SIZE, SIZE)
    marked = mark_batch(originals, pattern, SEEDS, cfg)
    return summarise_survival(
        [
            survival_correlations(
                originals, marked, cfg, np.broadcast_to(pattern, originals.shape), SEEDS, qualities=(75,)
            )
        ]
    )


def test_raw_storage_keeps_the_mark(originals: np.ndarray) -> None:
    result = _survival(originals, MarkConfig(noise="perlin"))
    assert result["n_images"] == 4 and set(result) == {"raw", "jpeg75", "n_images"}
    assert result["raw"]["full"] > 0.99
    assert result["raw"]["noise"] > 0.95


def test_jpeg_weakens_the_noise(originals: np.ndarray) -> None:
    result = _survival(originals, MarkConfig(noise="perlin"))
    assert result["jpeg75"]["noise"] < result["raw"]["noise"]


def test_no_noise_has_no_noise_correlation(originals: np.ndarray) -> None:
    result = _survival(originals, MarkConfig(noise="none"))
    assert result["raw"]["noise"] is None and result["jpeg75"]["noise"] is None
    assert result["raw"]["full"] > 0.99  # the pattern blend is still there


def test_jpeg_roundtrip_keeps_channel_order() -> None:
    red = np.zeros((1, 16, 16, 3), np.uint8)
    red[..., 0] = 200
    decoded = jpeg_roundtrip(red, 95).astype(int)
    assert np.abs(decoded - red).max() <= 3
