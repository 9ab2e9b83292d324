from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MarkConfig
from pipeline.core.marking import fractal_perlin, mark_batch, noise_delta, perlin_params, perlin_signs, stripe_pattern

EPS = 8 / 255


def _images(n: int = 4, h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["perlin", "uniform"])
def test_noise_is_plus_minus_epsilon(kind: str) -> None:
    delta = noise_delta(kind, np.arange(5, dtype=np.uint64), 20, 24, EPS)
    assert delta.shape[:3] == (5, 20, 24) and delta.shape[3] in (1, 3)
    assert np.allclose(np.unique(delta), [-EPS, EPS])


def test_perlin_signs_balanced_and_seeded() -> None:
    signs = perlin_signs(np.arange(8, dtype=np.uint64), 64, 64)
    assert 0.3 < (signs > 0).mean() < 0.7
    assert not np.array_equal(signs[0], signs[1])
    assert np.array_equal(signs[3], perlin_signs(np.array([3], dtype=np.uint64), 64, 64)[0])  # batch-independent


def test_noise_step_bounded_and_clipped() -> None:
    """With alpha = 1 the output is x + delta clipped: every pixel moves by at most epsilon (+ rounding)."""
    imgs = _images()
    imgs[0] = 0
    imgs[1] = 255
    cfg = MarkConfig(noise="perlin", epsilon=EPS, alpha=1.0)
    out = mark_batch(imgs, np.zeros((28, 28, 3), np.float32), np.arange(4, dtype=np.uint64), cfg)
    diff = out.astype(int) - imgs.astype(int)
    assert np.abs(diff).max() <= round(EPS * 255)
    assert out.dtype == np.uint8
    step = round(EPS * 255)  # black and white images: the step away from the bound lands, the other is clipped
    assert set(np.unique(out[0]).tolist()) == {0, step} and set(np.unique(out[1]).tolist()) == {255 - step, 255}
    assert (np.abs(diff[2:]) == round(EPS * 255)).mean() > 0.9  # away from the clip bounds the full step lands


def test_blend_formula_and_range() -> None:
    imgs = _images()
    pattern = stripe_pattern(7, 28, 28)
    cfg = MarkConfig(noise="none", alpha=0.7)
    out = mark_batch(imgs, pattern, np.arange(4, dtype=np.uint64), cfg)
    expected = np.rint((0.7 * imgs / 255.0 + 0.3 * pattern) * 255)
    assert np.abs(out.astype(int) - expected).max() <= 1
    full = mark_batch(imgs, pattern, np.arange(4, dtype=np.uint64), MarkConfig(noise="perlin", alpha=0.7))
    assert (
        np.abs(full.astype(int) - expected).max() <= round(0.7 * MarkConfig().epsilon * 255) + 1
    )  # noise after blend: alpha * eps


def test_identity_when_unmarked() -> None:
    imgs = _images()
    cfg = MarkConfig(noise="none", epsilon=0.0, alpha=1.0)
    assert np.array_equal(mark_batch(imgs, stripe_pattern(1, 28, 28), np.arange(4, dtype=np.uint64), cfg), imgs)


def test_marks_are_deterministic() -> None:
    imgs = _images()
    cfg = MarkConfig()
    a = mark_batch(imgs, stripe_pattern(3, 28, 28), np.arange(4, dtype=np.uint64), cfg)
    b = mark_batch(imgs, stripe_pattern(3, 28, 28), np.arange(4, dtype=np.uint64), cfg)
    assert np.array_equal(a, b)


def test_users_get_different_patterns() -> None:
    patterns = [stripe_pattern(seed, 32, 32) for seed in range(50)]
    flat = {p.tobytes() for p in patterns}
    assert len(flat) == 50


@pytest.mark.parametrize("height", [7, 16, 28, 30, 33, 224])
def test_stripe_geometry(height: int) -> None:
    """No row is left uncoloured (the official code leaves leftover rows black), each band is one
    colour, and for H >= 16 all 16 bands appear with heights differing by at most one row."""
    n = 16
    pattern = stripe_pattern(11, height, 5, n)
    reference = stripe_pattern(11, n, 5, n)  # one row per band: the band colours in order
    assert pattern.shape == (height, 5, 3)
    assert pattern.min() >= 128 / 255 - 1e-6 and pattern.max() < 160 / 255  # compressed palette, no black rows
    assert (pattern == pattern[:, :1]).all()  # horizontal stripes
    # walk the rows: each row is the colour of the band it falls in, bands appear in order
    band_of_row = (np.arange(height) * n) // height
    assert np.array_equal(pattern[:, 0], reference[band_of_row, 0])
    if height >= n:
        heights = np.bincount(band_of_row, minlength=n)
        assert heights.min() >= 1 and heights.max() - heights.min() <= 1
        assert np.array_equal(pattern[-1], reference[-1])


@pytest.mark.parametrize("noise", ["perlin", "uniform", "none"])
def test_torch_backend_agrees_with_numpy(noise: str) -> None:
    """The torch path (run here on the CPU; on CUDA in production) matches numpy to within 1/255."""
    imgs = _images(6, 40, 33)
    pattern = stripe_pattern(5, 40, 33)
    seeds = np.arange(10, 16, dtype=np.uint64)
    cfg = MarkConfig(noise=noise)
    ours = mark_batch(imgs, pattern, seeds, cfg)
    other = mark_batch(imgs, pattern, seeds, cfg, device="cpu")
    assert np.abs(ours.astype(int) - other.astype(int)).max() <= 1
    assert (ours != other).mean() < 0.01


def _perlin_reference(x: float, y: float, perm: np.ndarray) -> float:
    """Textbook 2-D Perlin noise at one point (eight gradient directions), for checking."""
    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731
    xi, yi = int(np.floor(x)) & 255, int(np.floor(y)) & 255
    fx, fy = x - np.floor(x), y - np.floor(y)

    def grad(dx: int, dy: int) -> float:
        h = perm[perm[xi + dx] + yi + dy] & 7
        return np.cos(h * np.pi / 4) * (fx - dx) + np.sin(h * np.pi / 4) * (fy - dy)

    u, v = fade(fx), fade(fy)
    bottom = grad(0, 0) + u * (grad(1, 0) - grad(0, 0))
    top = grad(0, 1) + u * (grad(1, 1) - grad(0, 1))
    return bottom + v * (top - bottom)


def test_separable_perlin_equals_per_pixel_definition() -> None:
    params = perlin_params(np.array([7], dtype=np.uint64))
    perm, period = params["perm"][0], 13.0
    h, w = 23, 37
    ours = fractal_perlin(perm, period, 3, h, w)
    expected = np.array(
        [
            [
                sum(_perlin_reference(x * 2**k / period, y * 2**k / period, perm) / 2**k for k in range(3))
                for x in range(w)
            ]
            for y in range(h)
        ]
    )
    assert np.allclose(ours, expected, atol=1e-12)


def test_warp_signs_match_the_sine_definition() -> None:
    """The phase-based threshold equals sign(norm(sin(pi f norm(perlin))) - 0.5) up to float32
    rounding of phases that sit on a boundary (a few pixels in 10^4)."""
    from pipeline.core.marking import NUMPY, _warp_signs

    mismatched = total_pixels = 0
    for seed in range(20):
        p = perlin_params(np.array([seed], dtype=np.uint64))
        total = fractal_perlin(p["perm"][0], float(p["period"][0]), int(p["octaves"][0]), 48, 48)
        n = (total - total.min()) / (total.max() - total.min())
        warp = np.sin(np.pi * p["freq"][0] * n)
        reference = np.where((warp - warp.min()) / (warp.max() - warp.min()) >= 0.5, 1.0, -1.0)
        ours = _warp_signs(total, float(p["freq"][0]), NUMPY).reshape(48, 48)
        mismatched += int((ours != reference).sum())
        total_pixels += reference.size
    assert mismatched / total_pixels < 1e-3


def test_ood_image_patterns(tmp_path) -> None:
    """OOD patterns: drawn per user from a folder (any size, resized to the grid) or a dataset,
    deterministic for a seed, different across users."""
    from PIL import Image

    from pipeline.core.marking import make_pattern
    from pipeline.data.ood import ood_pool

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (50 + i, 70, 3), dtype=np.uint8)).save(tmp_path / f"ood{i}.png")
    cfg = MarkConfig(pattern="ood_image", ood_folder=str(tmp_path))
    pool = ood_pool(cfg, 32)
    patterns = [make_pattern(cfg, seed, 28, 30, pool) for seed in range(8)]
    assert all(p.shape == (28, 30, 3) and p.dtype == np.float32 and 0 <= p.min() <= p.max() <= 1 for p in patterns)
    assert np.array_equal(patterns[3], make_pattern(cfg, 3, 28, 30, pool))
    assert len({p.tobytes() for p in patterns}) > 1
    dataset_cfg = MarkConfig(pattern="ood_image", ood_dataset="synthetic")
    assert make_pattern(dataset_cfg, 1, 16, 16, ood_pool(dataset_cfg, 16)).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="ood_folder"):
        MarkConfig(pattern="ood_image")
