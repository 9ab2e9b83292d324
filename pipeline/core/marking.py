"""The MembershipTracker mark, vectorised over a batch of images.

Step 1 adds a binary perturbation delta = sign(n - 0.5) * epsilon, where n is a sin-warped Perlin
map drawn per image (or i.i.d. signs for `uniform`), and clips to [0, 1]. Step 2 blends with the
user's pattern: x' = alpha * (x + delta) + (1 - alpha) * p. Every random choice comes from seeds,
so the same seeds give bit-identical marks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numba
import numpy as np
import torch

from ..config import MarkConfig

# Common colours (RGB, 0-255) for stripes; compressed to c/8 + 128 so every channel lies in
# [128, 160): a low-contrast wash the model can memorise without it dominating the image.
STRIPE_PALETTE = np.array(
    [
        (255, 0, 0),
        (0, 128, 0),
        (0, 0, 255),
        (255, 255, 0),
        (0, 255, 255),
        (255, 0, 255),
        (255, 255, 255),
        (0, 0, 0),
        (255, 165, 0),
        (128, 0, 128),
        (255, 192, 203),
        (165, 42, 42),
        (128, 128, 128),
        (0, 0, 128),
        (128, 128, 0),
        (0, 128, 128),
    ],
    dtype=np.float32,
)

# Perlin gradients: eight unit directions.
_GRADIENTS = np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=-1)


def stripe_pattern(seed: int, height: int, width: int, n_stripes: int = 16) -> np.ndarray:
    """A user's pattern: `n_stripes` horizontal bands of palette colours, (H, W, 3) float32 in [0, 1].

    Row r belongs to band floor(r * n_stripes / H), so bands differ by at most one row in height and
    cover every row whether or not H is divisible by `n_stripes`."""
    rng = np.random.default_rng(seed)
    colours = STRIPE_PALETTE[rng.integers(0, len(STRIPE_PALETTE), n_stripes)] / 8.0 + 128.0
    band_of_row = (np.arange(height) * n_stripes) // height
    rows = colours[band_of_row] / 255.0
    return np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (height, width, 3)), dtype=np.float32)


@dataclass(frozen=True)
class Backend:
    """The handful of array operations whose spelling differs between numpy and torch; the noise
    math below is written once against it and runs on numpy (CPU) or torch (any device)."""

    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    amin: Callable[[Any], Any]  # min over axis 1, kept
    amax: Callable[[Any], Any]
    floor: Callable[[Any], Any]
    where: Callable[[Any, Any, Any], Any]
    clip: Callable[[Any, float, float], Any]
    rint: Callable[[Any], Any]
    f32: Callable[[Any], Any]
    stack: Callable[[list[Any]], Any]


NUMPY = Backend(
    np.asarray,
    np.asarray,
    lambda a: a.min(axis=1, keepdims=True),
    lambda a: a.max(axis=1, keepdims=True),
    np.floor,
    np.where,
    np.clip,
    np.rint,
    lambda a: a.astype(np.float32),
    np.stack,
)


def torch_backend(device: str | torch.device) -> Backend:
    """Torch on `device`: the same math as NUMPY, for GPUs (and checked against it on CPU).

    The noise map stays in float64 like numpy's, because its sign is a threshold: float32 rounding
    flips about 1 pixel in 4000 by 2 * alpha * epsilon."""
    dev = torch.device(device)

    def asarray(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    return Backend(
        asarray,
        lambda t: t.cpu().numpy(),
        lambda t: t.amin(dim=1, keepdim=True),
        lambda t: t.amax(dim=1, keepdim=True),
        torch.floor,
        torch.where,
        torch.clamp,
        torch.round,
        lambda t: t.float(),
        torch.stack,
    )


def get_backend(device: str | None) -> Backend:
    """`None`/"numpy" for numpy; a torch device name ("cpu", "cuda", "cuda:1") for torch."""
    return NUMPY if device in (None, "numpy") else torch_backend(device)


class OODPool:
    """The out-of-distribution images users' patterns are drawn from, loaded on demand."""

    def __init__(self, size: int, load: Callable[[int], np.ndarray], name: str) -> None:
        if size < 1:
            raise ValueError(f"{name}: no images to draw OOD patterns from")
        self.size, self.load, self.name = size, load, name

    @classmethod
    def from_array(cls, images: np.ndarray, name: str) -> OODPool:
        return cls(len(images), lambda i: images[i], name)

    def pattern(self, seed: int, height: int, width: int) -> np.ndarray:
        """The image the seed picks, resized to the marking grid, (H, W, 3) float32 in [0, 1]."""
        image = self.load(int(np.random.default_rng(seed).integers(self.size)))
        shrink = image.shape[0] > height or image.shape[1] > width
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return resized.astype(np.float32) / 255.0


def make_pattern(cfg: MarkConfig, seed: int, height: int, width: int, pool: OODPool | None = None) -> np.ndarray:
    """A user's pattern p: stripes, or an OOD image drawn from `pool`."""
    if cfg.pattern == "stripes":
        return stripe_pattern(seed, height, width, cfg.n_stripes)
    if pool is None:
        raise ValueError("mark.pattern 'ood_image' needs an OOD pool")
    return pool.pattern(seed, height, width)


def resolve_device(device: str) -> str | None:
    """Marking backend for a config value: torch on CUDA when asked or available, else numpy."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else None
    return None if device == "numpy" else device


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _axis(n_pixels: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice cell, offset inside the cell, and fade weight of each pixel along one axis."""
    coord = np.arange(n_pixels) * scale
    cell = np.floor(coord).astype(np.int64)
    offset = coord - cell
    return cell, offset, _fade(offset)


def _octave_factors(
    perm: np.ndarray, scale: float, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Perlin octave as a product of two small matrices: noise = L @ R, L (H, 2m), R (2m, W).

    Within a lattice cell, Perlin noise is separable: interpolating the four corner gradients along
    x gives, for each lattice row j, a value P[j, x] and a slope Q[j, x] in y; the noise at (y, x)
    is (1-v) (P[j, x] + fy Q[j, x]) + v (P[j+1, x] + (fy-1) Q[j+1, x]) with j the pixel's cell row.
    So row y of L has only four non-zeros: returned as their columns and weights, (H, 4) each, with
    R = [P; Q]."""
    cx, fx, u = _axis(width, scale)
    cy, fy, v = _axis(height, scale)
    n_rows, n_cols = int(cy[-1]) + 2, int(cx[-1]) + 2
    # corner hash exactly as Perlin's: perm[perm[x & 255] + (y & 255)] & 7 (perm holds 512 entries)
    corner = perm[perm[np.arange(n_cols) & 255][None, :] + (np.arange(n_rows) & 255)[:, None]] & 7
    gx, gy = _GRADIENTS[corner, 0], _GRADIENTS[corner, 1]
    p_rows = (1 - u) * gx[:, cx] * fx + u * gx[:, cx + 1] * (fx - 1)  # (n_rows, W)
    q_rows = (1 - u) * gy[:, cx] + u * gy[:, cx + 1]
    columns = np.stack([cy, n_rows + cy, cy + 1, n_rows + cy + 1], axis=1)
    weights = np.stack([1 - v, (1 - v) * fy, v, v * (fy - 1)], axis=1)
    return columns, weights, np.concatenate([p_rows, q_rows])


def perlin_params(seeds: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, from a generator seeded by its seed: the permutation table, the period in
    [30, 59], the octave count in [1, 4] and the warp frequency in [20, 59]."""
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1)
    params = {
        "perm": np.empty((seeds.size, 512), np.int64),
        "period": np.empty(seeds.size),
        "octaves": np.empty(seeds.size, np.int64),
        "freq": np.empty(seeds.size),
    }
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        p = rng.permutation(256)
        params["perm"][i] = np.concatenate([p, p])
        params["period"][i] = rng.integers(30, 60)
        params["octaves"][i] = rng.integers(1, 5)
        params["freq"][i] = rng.integers(20, 60)
    return params


def perlin_signs(seeds: np.ndarray, height: int, width: int, xp: Backend = NUMPY) -> Any:
    """(B, H, W) array of +-1: sign(n - 0.5) of n = norm(sin(pi f norm(fractal Perlin))), one per seed.

    The fractal sum (lacunarity 2, persistence 0.5) of an image's octaves is a single matrix product
    (see `_octave_factors`), done on the backend in float64. The warp's sign is then found without
    evaluating the sine per pixel (see `_warp_signs`)."""
    p = perlin_params(seeds)
    out = []
    for perm, period, octaves, freq in zip(p["perm"], p["period"], p["octaves"], p["freq"]):
        total = fractal_perlin(perm, float(period), int(octaves), height, width, xp)
        out.append(_warp_signs(total, float(freq), xp).reshape(height, width))
    return xp.stack(out)


def fractal_perlin(perm: np.ndarray, period: float, octaves: int, height: int, width: int, xp: Backend = NUMPY) -> Any:
    """(H, W) sum over octaves k of perlin(x 2^k / period, y 2^k / period) / 2^k, as one matrix
    product L @ R whose left factor has four non-zeros per row and octave: on numpy only those are
    multiplied (`_sparse_rows`, 4 x octaves multiply-adds per pixel instead of one per column of L,
    ~25x fewer at 512 x 384), on torch the dense product runs on the device."""
    factors = [_octave_factors(perm, 2.0**k / period, height, width) for k in range(octaves)]
    offsets = np.cumsum([0] + [len(f[2]) for f in factors])
    columns = np.concatenate([f[0] + offsets[k] for k, f in enumerate(factors)], axis=1)
    weights = np.concatenate([f[1] / 2.0**k for k, f in enumerate(factors)], axis=1)
    right = np.concatenate([f[2] for f in factors])
    if xp is NUMPY:
        return _sparse_rows(columns, weights, right)
    return xp.asarray(dense_left(columns, weights, len(right))) @ xp.asarray(right)


def dense_left(columns: np.ndarray, weights: np.ndarray, n_columns: int) -> np.ndarray:
    """The left factor as a dense (H, n_columns) matrix, from its non-zeros per row."""
    left = np.zeros((columns.shape[0], n_columns))
    np.add.at(left, (np.arange(columns.shape[0])[:, None], columns), weights)
    return left


@numba.njit(cache=True, nogil=True)
def _sparse_rows(columns: np.ndarray, weights: np.ndarray, right: np.ndarray) -> np.ndarray:
    """L @ right for L given row by row as (columns, weights) of its non-zeros, summed in that order."""
    out = np.zeros((columns.shape[0], right.shape[1]))
    for y in range(columns.shape[0]):
        for j in range(columns.shape[1]):
            row, weight = right[columns[y, j]], weights[y, j]
            for x in range(right.shape[1]):
                out[y, x] += weight * row[x]
    return out


def _warp_signs(total: Any, freq: float, xp: Backend) -> Any:
    """+-1 where norm(sin(pi f norm(total))) >= 0.5, without evaluating a sine per pixel.

    With q the phase (in periods) of the warp and c the midpoint of the sine's range over the pixels,
    sin(2 pi q) >= c holds exactly when q lies within w = 1/4 - asin(c) / (2 pi) of 1/4 on the
    circle. The largest sine is cos(2 pi d) with d the smallest circular distance of a phase to 1/4,
    the smallest is -cos(2 pi d') with d' that to 3/4. Per pixel only float32 additions,
    multiplications, floors and comparisons remain: exact IEEE operations, so numpy and torch (CPU
    or CUDA) give the same signs."""
    total = xp.f32(total.reshape(-1))
    lo, hi = float(xp.amin(total[None]).item()), float(xp.amax(total[None]).item())
    scale = np.float32(freq / 2 / max(hi - lo, 1e-12))  # periods of the warp across the range of total
    offset = np.float32(-lo * float(scale))
    if xp is NUMPY:  # the same float32 operations, fused into two passes
        return _warp_signs_fused(total, scale, offset)
    periods = total * scale + offset
    phase = periods - xp.floor(periods)
    gap = abs(phase - np.float32(0.25))  # in [0, 3/4); the circular distance is min(gap, 1 - gap)
    gap_far = abs(phase - np.float32(0.75))
    width = _arc_width(
        float(xp.amin(gap[None]).item()),
        float(xp.amax(gap[None]).item()),
        float(xp.amin(gap_far[None]).item()),
        float(xp.amax(gap_far[None]).item()),
    )
    if width <= 0.25:  # the arc around 1/4 does not wrap past 0 or 1
        inside = gap <= np.float32(width)
    else:  # circular distance <= width  <=>  gap is not strictly between width and 1 - width
        inside = abs(gap - np.float32(0.5)) >= np.float32(0.5 - width)
    return xp.where(inside, np.float32(1.0), np.float32(-1.0))


def _arc_width(gap_min: float, gap_max: float, far_min: float, far_max: float) -> float:
    """Half-width w of the arc around phase 1/4 where the sine is at least its range's midpoint."""
    d_top, d_bottom = min(gap_min, 1.0 - gap_max), min(far_min, 1.0 - far_max)
    mid = (np.cos(2 * np.pi * d_top) - np.cos(2 * np.pi * d_bottom)) / 2
    return 0.25 - float(np.arcsin(np.clip(mid, -1.0, 1.0))) / (2 * np.pi)


@numba.njit(cache=True, nogil=True)
def _warp_stats(total: np.ndarray, scale: np.float32, offset: np.float32) -> tuple[float, float, float, float]:
    inf = np.float32(np.inf)
    gap_min, gap_max, far_min, far_max = inf, -inf, inf, -inf
    for v in total:
        periods = v * scale + offset
        phase = periods - np.floor(periods)
        gap, far = abs(phase - np.float32(0.25)), abs(phase - np.float32(0.75))
        gap_min, gap_max = min(gap_min, gap), max(gap_max, gap)
        far_min, far_max = min(far_min, far), max(far_max, far)
    return gap_min, gap_max, far_min, far_max


@numba.njit(cache=True, nogil=True)
def _warp_mark(total: np.ndarray, scale: np.float32, offset: np.float32, bound: np.float32, wraps: bool) -> np.ndarray:
    out = np.empty(total.size, np.float32)
    for i, v in enumerate(total):
        periods = v * scale + offset
        gap = abs(periods - np.floor(periods) - np.float32(0.25))
        inside = abs(gap - np.float32(0.5)) >= bound if wraps else gap <= bound
        out[i] = np.float32(1.0) if inside else np.float32(-1.0)
    return out


def _warp_signs_fused(total: np.ndarray, scale: np.float32, offset: np.float32) -> np.ndarray:
    width = _arc_width(*(float(x) for x in _warp_stats(total, scale, offset)))
    wraps = width > 0.25
    return _warp_mark(total, scale, offset, np.float32(0.5 - width if wraps else width), wraps)


def uniform_signs(seeds: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H, W, 3) i.i.d. +-1 per pixel and channel, one generator per seed."""
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1)
    out = np.empty((seeds.size, height, width, 3), dtype=np.float32)
    for i, seed in enumerate(seeds):
        out[i] = np.random.default_rng(int(seed)).integers(0, 2, (height, width, 3)) * 2.0 - 1.0
    return out


def noise_delta(kind: str, seeds: np.ndarray, height: int, width: int, epsilon: float, xp: Backend = NUMPY) -> Any:
    """Step 1's perturbation with every entry in {-epsilon, 0, +epsilon}: (B, H, W, 1) for Perlin
    noise (one map on all three channels, broadcast), (B, H, W, 3) for uniform noise."""
    if kind == "perlin":
        return epsilon * perlin_signs(seeds, height, width, xp)[..., None]
    if kind == "uniform":
        return epsilon * xp.asarray(uniform_signs(seeds, height, width))
    if kind == "none":
        return xp.asarray(np.zeros((len(seeds), height, width, 3), dtype=np.float32))
    raise ValueError(f"mark.noise: unknown noise '{kind}'")


def shape_groups(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Positions of the images grouped by size, in order of first appearance: code that works on a
    batch of one size (`mark_batch`, survival) runs once per group over images of varying size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return [np.array(group, dtype=np.int64) for group in groups.values()]


def mark_batch(
    images: np.ndarray, pattern: np.ndarray, noise_seeds: np.ndarray, cfg: MarkConfig, device: str | None = None
) -> np.ndarray:
    """Mark a batch of one user's images: (B, H, W, 3) uint8 -> (B, H, W, 3) uint8.

    Blended in float32 with numpy (`device=None`) or torch on `device`, on the 0..255 scale; the
    noisy image is clipped to the valid range before blending, so the result stays in range and
    rounds to the nearest stored value."""
    xp = get_backend(device)
    b, h, w, _ = images.shape
    # on the 0..255 scale: clip(x + 255 delta), times alpha, plus (1 - alpha) 255 p, rounded
    delta = (
        xp.f32(noise_delta(cfg.noise, noise_seeds, h, w, cfg.epsilon * 255.0, xp))
        if cfg.noise != "none"
        else xp.asarray(np.zeros((b, h, w, 1), np.float32))
    )
    blend = xp.asarray(((1.0 - cfg.alpha) * 255.0 * np.asarray(pattern, dtype=np.float64)).astype(np.float32))
    if xp is NUMPY:  # one fused pass instead of six array passes over every channel of every pixel
        out = np.empty_like(images)
        _blend_uint8(images, delta, blend, np.float32(cfg.alpha), out)
        return out
    x = xp.clip(xp.f32(xp.asarray(images)) + delta, 0.0, 255.0)
    return xp.to_numpy(xp.rint(x * np.float32(cfg.alpha) + blend[None])).astype(np.uint8)


@numba.njit(cache=True, nogil=True)
def _blend_uint8(images: np.ndarray, delta: np.ndarray, blend: np.ndarray, alpha: np.float32, out: np.ndarray) -> None:
    one_delta = delta.shape[3] == 1
    for i in range(images.shape[0]):
        for y in range(images.shape[1]):
            for x in range(images.shape[2]):
                for c in range(3):
                    d = delta[i, y, x, 0] if one_delta else delta[i, y, x, c]
                    v = min(max(np.float32(images[i, y, x, c]) + d, np.float32(0.0)), np.float32(255.0))
                    out[i, y, x, c] = np.uint8(np.rint(v * alpha + blend[y, x, c]))
