"""The marking benchmark: its baseline is a real implementation of the official per-pixel mark, and
its README line is generated, replaced and never duplicated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.common import update_bench_readme
from bench.marking import official_mark_batch, official_noise_delta, official_perlin_map, readme_line
from pipeline.config import MarkConfig
from pipeline.core.marking import stripe_pattern

EPS = 8 / 255
SEEDS = np.arange(2, dtype=np.uint64)


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize(("period", "octaves", "base"), [(30.0, 4, 3), (59.0, 1, 200), (45.0, 2, 0)])
def test_perlin_map_is_finite_and_smooth(period: float, octaves: int, base: int) -> None:
    raw = official_perlin_map(16, 16, period, octaves, base)
    assert raw.shape == (16, 16) and np.isfinite(raw).all()
    spread = raw.max() - raw.min()
    assert spread > 0
    # Neighbours differ far less than unrelated values would (about a third of the range).
    for axis in (0, 1):
        assert np.abs(np.diff(raw, axis=axis)).mean() < 0.15 * spread


def test_noise_is_plus_minus_epsilon() -> None:
    delta = official_noise_delta(SEEDS, 16, 16, EPS)
    assert delta.shape == (2, 16, 16, 1)
    for image in delta:  # normalisation puts the map's extremes at 0 and 1, so both signs occur
        assert np.allclose(np.unique(image), [-EPS, EPS])


def test_marked_images_follow_the_blend() -> None:
    images, pattern = _images(), stripe_pattern(0, 16, 16)
    cfg = MarkConfig(noise="perlin", epsilon=EPS, alpha=0.7)
    out = official_mark_batch(images, pattern, SEEDS, cfg)
    assert out.shape == images.shape and out.dtype == np.uint8
    noisy = np.clip(images / 255.0 + official_noise_delta(SEEDS, 16, 16, EPS), 0.0, 1.0)
    expected = np.rint((0.7 * noisy + 0.3 * pattern) * 255.0)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_noise_step_alone_moves_pixels_by_epsilon() -> None:
    images = _images(1)
    out = official_mark_batch(images, np.zeros((16, 16, 3), np.float32), SEEDS, MarkConfig(epsilon=EPS, alpha=1.0))
    step = np.abs(out.astype(int) - images)
    assert step.max() <= round(EPS * 255)
    inside = (images >= 8) & (images <= 247)  # away from the clip bounds the full step lands
    assert (step[inside] == round(EPS * 255)).all()


def test_readme_keeps_one_line_per_result_file(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    rows = [
        {"case": f"mark {s}x{s} perlin, 1 core", "ours": 2.0 * s, "baseline": s, "unit": "img/s", "ratio": 2.0}
        for s in (32, 224)
    ]
    update_bench_readme("other.json", "- `other.json` — kept", readme)
    update_bench_readme("marking.json", readme_line(rows), readme)
    update_bench_readme("marking.json", readme_line(rows), readme)
    lines = readme.read_text().splitlines()
    assert lines[0] == "# Benchmarks" and "- `other.json` — kept" in lines
    (line,) = [line for line in lines if line.startswith("- `marking.json`")]
    assert line.index("224²: 2.0× (ours 448 img/s vs 224 img/s)") < line.index("32²: 2.0×")
