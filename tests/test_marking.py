from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import MarkConfig
from pipeline.core.marking import (
    _GRADIENTS,
    NUMPY,
    _fractal_factors,
    _warp_signs,
    _warp_stats,
    dense_left,
    fractal_perlin,
    mark_batch,
    noise_delta,
    perlin_params,
    perlin_signs,
    stripe_pattern,
    torch_backend,
)

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


# Marks already published are re-marked at audit time and compared pixel for pixel: the compiled
# numpy path must give exactly the bytes its array formulas give, for every size and parameter.
SEEDS_ALL_OCTAVES = np.array([0, 1, 2, 3, 2**63 + 5, 123456789], np.uint64)
ODD_SIZES = [(37, 53), (16, 16), (28, 28), (96, 128), (1, 1), (5, 2)]


def _octave_reference(perm: np.ndarray, scale: float, height: int, width: int) -> tuple[np.ndarray, ...]:
    """One octave's (columns, weights, [P; Q]) as numpy array formulas, the code marks were first made with."""
    axes = []
    for n in (width, height):
        coord = np.arange(n) * scale
        cell = np.floor(coord).astype(np.int64)
        t = coord - cell
        axes.append((cell, t, t * t * t * (t * (t * 6 - 15) + 10)))
    (cx, fx, u), (cy, fy, v) = axes
    n_rows, n_cols = int(cy[-1]) + 2, int(cx[-1]) + 2
    corner = perm[perm[np.arange(n_cols) & 255][None, :] + (np.arange(n_rows) & 255)[:, None]] & 7
    gx, gy = _GRADIENTS[corner, 0], _GRADIENTS[corner, 1]
    p_rows = (1 - u) * gx[:, cx] * fx + u * gx[:, cx + 1] * (fx - 1)
    q_rows = (1 - u) * gy[:, cx] + u * gy[:, cx + 1]
    columns = np.stack([cy, n_rows + cy, cy + 1, n_rows + cy + 1], axis=1)
    return columns, np.stack([1 - v, (1 - v) * fy, v, v * (fy - 1)], axis=1), np.concatenate([p_rows, q_rows])


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("height, width", ODD_SIZES)
def test_perlin_map_is_bit_identical_to_array_formulas(height: int, width: int) -> None:
    """The compiled factors equal the array formulas bit for bit, and each pixel's sum adds its
    products in column order from 0.0 (float64; the float32 map is that sum rounded once)."""
    params = perlin_params(SEEDS_ALL_OCTAVES)
    for perm, period in zip(params["perm"][:2], params["period"][:2]):
        for octaves in (1, 2, 3, 4):
            parts = [_octave_reference(perm, 2.0**k / period, height, width) for k in range(octaves)]
            first = np.cumsum([0] + [len(part[2]) for part in parts])
            columns, weights, right = _fractal_factors(perm, float(period), octaves, height, width)
            assert _same_bytes(columns, np.concatenate([c + first[k] for k, (c, _, _) in enumerate(parts)], axis=1))
            assert _same_bytes(weights, np.concatenate([w / 2.0**k for k, (_, w, _) in enumerate(parts)], axis=1))
            assert _same_bytes(right, np.concatenate([r for _, _, r in parts]))
            expected = np.zeros((height, width))
            for j in range(columns.shape[1]):
                expected = expected + weights[:, j, None] * right[columns[:, j]]
            assert _same_bytes(fractal_perlin(perm, float(period), octaves, height, width), expected)
            assert np.allclose(dense_left(columns, weights, len(right)) @ right, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("height, width", [(37, 53), (96, 128), (1, 1), (5, 2)])
def test_numpy_signs_equal_torch_signs_bitwise(height: int, width: int) -> None:
    """The compiled warp (per-lane minima, one pass for the signs) and torch's array version of the
    same float32 operations threshold the same map identically."""
    params = perlin_params(SEEDS_ALL_OCTAVES)
    ours = perlin_signs(SEEDS_ALL_OCTAVES, height, width)
    for i, (perm, period, octaves, freq) in enumerate(zip(*(params[k] for k in ("perm", "period", "octaves", "freq")))):
        total = torch.from_numpy(fractal_perlin(perm, float(period), int(octaves), height, width))
        theirs = _warp_signs(total, float(freq), torch_backend("cpu")).numpy().reshape(height, width)
        assert _same_bytes(ours[i], theirs)
        assert _same_bytes(ours[i], _warp_signs(total.numpy(), float(freq), NUMPY).reshape(height, width))


@pytest.mark.parametrize("size", [1, 5, 63, 64, 65, 1000, 4099])
def test_warp_stats_equal_array_minima(size: int) -> None:
    """The compiled phase statistics, kept per lane, equal numpy's minima and maxima of the same
    float32 phases, whatever the map's length (a partial last lane included)."""
    rng = np.random.default_rng(size)
    total = (rng.standard_normal(size) * 0.3).astype(np.float32)
    for scale, offset in ((np.float32(17.3), np.float32(4.1)), (np.float32(0.05), np.float32(0.93))):
        periods = total * scale + offset
        phase = periods - np.floor(periods)
        gap, far = np.abs(phase - np.float32(0.25)), np.abs(phase - np.float32(0.75))
        expected = (gap.min(), gap.max(), far.min(), far.max())
        assert [np.float32(x) for x in _warp_stats(total, scale, offset)] == list(expected)


def _marked_reference(images: np.ndarray, pattern: np.ndarray, signs: np.ndarray, cfg: MarkConfig) -> np.ndarray:
    """mark_batch's formula as float32 numpy arrays (the torch path's steps): clip(x + 255 epsilon
    sign) alpha + (1 - alpha) 255 p, rounded."""
    blend = ((1.0 - cfg.alpha) * 255.0 * pattern.astype(np.float64)).astype(np.float32)
    noisy = np.clip(images.astype(np.float32) + (cfg.epsilon * 255.0 * signs)[..., None], 0.0, 255.0)
    return np.rint(noisy * np.float32(cfg.alpha) + blend).astype(np.uint8)


@pytest.mark.parametrize("height, width", ODD_SIZES)
def test_fused_perlin_mark_is_bit_identical_to_its_pieces(height: int, width: int) -> None:
    """One pass per image finds each pixel's sign and writes its blended channels: the same bytes
    as perlin_signs and the blend formula, in either layout, for every octave count, epsilon and
    alpha, with black and white images clipped at 0 and 255."""
    rng = np.random.default_rng(height * 1000 + width)
    assert set(perlin_params(SEEDS_ALL_OCTAVES)["octaves"]) == {1, 2, 3, 4}
    images = rng.integers(0, 256, (len(SEEDS_ALL_OCTAVES), height, width, 3), dtype=np.uint8)
    images[0], images[1] = 0, 255
    signs = perlin_signs(SEEDS_ALL_OCTAVES, height, width)
    for pattern in (stripe_pattern(4, height, width), rng.random((height, width, 3), dtype=np.float32)):
        for epsilon, alpha in (
            (8 / 255, 0.7),
            (0.0, 1.0),
            (0.5, 1.0),
            (1.0, 0.05),
            (3 / 255, 0.31),
            (0.2697867137638703, 0.618034),
        ):
            cfg = MarkConfig(epsilon=epsilon, alpha=alpha)
            out = mark_batch(images, pattern, SEEDS_ALL_OCTAVES, cfg)
            assert _same_bytes(out, _marked_reference(images, pattern, signs, cfg))
            first = mark_batch(images, pattern, SEEDS_ALL_OCTAVES, cfg, channels_first=True)
            assert _same_bytes(first, np.ascontiguousarray(out.transpose(0, 3, 1, 2)))
    clipped = mark_batch(images, pattern, SEEDS_ALL_OCTAVES, MarkConfig(epsilon=0.5, alpha=1.0))
    assert (clipped[0][signs[0] < 0] == 0).all() and (clipped[1][signs[1] > 0] == 255).all()  # the bounds held


@pytest.mark.parametrize("noise", ["perlin", "uniform", "none"])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_channels_first_is_the_transpose(noise: str, device: str | None) -> None:
    images, pattern, seeds = _images(3, 9, 14), stripe_pattern(2, 9, 14), np.arange(3, dtype=np.uint64)
    cfg = MarkConfig(noise=noise)
    last = mark_batch(images, pattern, seeds, cfg, device)
    first = mark_batch(images, pattern, seeds, cfg, device, channels_first=True)
    assert first.flags["C_CONTIGUOUS"] and _same_bytes(first, np.ascontiguousarray(last.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("channels_first", [False, True])
def test_non_contiguous_inputs_mark_like_contiguous_ones(channels_first: bool) -> None:
    images, seeds = _images(4, 20, 12).transpose(0, 2, 1, 3), np.arange(4, dtype=np.uint64)  # (4, 12, 20, 3)
    pattern = np.random.default_rng(1).random((20, 12, 3), dtype=np.float32).transpose(1, 0, 2)
    assert not images.flags["C_CONTIGUOUS"] and not pattern.flags["C_CONTIGUOUS"]
    expected = mark_batch(np.ascontiguousarray(images), np.ascontiguousarray(pattern), seeds, MarkConfig())
    out = mark_batch(images, pattern, seeds, MarkConfig(), channels_first=channels_first)
    assert _same_bytes(out, np.ascontiguousarray(expected.transpose(0, 3, 1, 2)) if channels_first else expected)
