"""The MembershipTracker mark, vectorised over a batch of images.

Step 1 adds a binary perturbation delta = sign(n - 0.5) * epsilon, where n is a sin-warped Perlin
map drawn per image (or i.i.d. signs for `uniform`), and clips to [0, 1]. Step 2 blends with the
user's pattern: x' = alpha * (x + delta) + (1 - alpha) * p. Every random choice comes from seeds,
so the same seeds give bit-identical marks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


@numba.njit(cache=True, nogil=True)
def _fade(t: float) -> float:
    return t * t * t * (t * (t * 6 - 15) + 10)


@numba.njit(cache=True, nogil=True)
def _fractal_factors(
    perm: np.ndarray, period: float, octaves: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fractal sum of `octaves` Perlin octaves as one product L @ R, L (H, 4 octaves) sparse.

    Within a lattice cell, Perlin noise is separable: interpolating the four corner gradients along
    x gives, for each lattice row j, a value P[j, x] and a slope Q[j, x] in y; the noise at (y, x)
    is (1-v) (P[j, x] + fy Q[j, x]) + v (P[j+1, x] + (fy-1) Q[j+1, x]) with j the pixel's cell row.
    So per octave k (frequency 2^k / period, amplitude 1 / 2^k) row y of L has only four non-zeros:
    returned as their columns and weights, (H, 4 octaves) each, with R (C-contiguous) stacking
    [P; Q] of every octave. Compiled (fancy indexing on small arrays took 0.3 ms of a 512 x 384
    photo's 3 ms, this takes 0.03 ms), with the same IEEE operations in the same order as the array
    version it replaced, so the maps, and the marks, stay bit for bit as they were."""
    first_row = np.zeros(octaves + 1, np.int64)  # where each octave's [P; Q] starts in R
    for k in range(octaves):
        first_row[k + 1] = first_row[k] + 2 * (int(np.floor((height - 1) * (2.0**k / period))) + 2)
    columns = np.empty((height, 4 * octaves), np.int64)
    weights = np.empty((height, 4 * octaves))
    right = np.empty((first_row[octaves], width))
    cx, fx, u = np.empty(width, np.int64), np.empty(width), np.empty(width)
    for k in range(octaves):
        amplitude, scale = 2.0**k, 2.0**k / period
        n_rows, n_cols = (first_row[k + 1] - first_row[k]) // 2, int(np.floor((width - 1) * scale)) + 2
        for y in range(height):
            cell = np.floor(y * scale)
            fy = y * scale - cell
            v = _fade(fy)
            j, top = 4 * k, first_row[k] + int(cell)
            columns[y, j], columns[y, j + 1], columns[y, j + 2], columns[y, j + 3] = (
                top,
                top + n_rows,
                top + 1,
                top + n_rows + 1,
            )
            weights[y, j], weights[y, j + 1] = (1 - v) / amplitude, (1 - v) * fy / amplitude
            weights[y, j + 2], weights[y, j + 3] = v / amplitude, v * (fy - 1) / amplitude
        for x in range(width):
            cell = np.floor(x * scale)
            cx[x], fx[x] = int(cell), x * scale - cell
            u[x] = _fade(fx[x])
        gx, gy = np.empty(n_cols), np.empty(n_cols)
        for r in range(n_rows):
            for c in range(n_cols):  # corner hash exactly as Perlin's (perm holds 512 entries)
                corner = perm[perm[c & 255] + (r & 255)] & 7
                gx[c], gy[c] = _GRADIENTS[corner, 0], _GRADIENTS[corner, 1]
            p_row, q_row = right[first_row[k] + r], right[first_row[k] + n_rows + r]
            for x in range(width):
                c = cx[x]
                p_row[x] = (1 - u[x]) * gx[c] * fx[x] + u[x] * gx[c + 1] * (fx[x] - 1)
                q_row[x] = (1 - u[x]) * gy[c] + u[x] * gy[c + 1]
    return columns, weights, right


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


def _per_image(params: dict[str, np.ndarray]) -> Iterator[tuple[np.ndarray, float, int, float]]:
    """(perm, period, octaves, freq) of each image, as the Python types the kernels take."""
    for perm, period, octaves, freq in zip(params["perm"], params["period"], params["octaves"], params["freq"]):
        yield perm, float(period), int(octaves), float(freq)


def perlin_signs(seeds: np.ndarray, height: int, width: int, xp: Backend = NUMPY) -> Any:
    """(B, H, W) float32 array of +-1: sign(n - 0.5) of n = norm(sin(pi f norm(fractal Perlin))),
    one per seed.

    The fractal sum (lacunarity 2, persistence 0.5) of an image's octaves is a single matrix product
    (see `_fractal_factors`), done on the backend in float64. The warp's sign is then found without
    evaluating the sine per pixel (see `_warp_signs`)."""
    params = perlin_params(seeds)
    if xp is NUMPY:
        total, out = np.empty((height, width), np.float32), np.empty((len(params["freq"]), height, width), np.float32)
        for i, (perm, period, octaves, freq) in enumerate(_per_image(params)):
            warp = _perlin_map(perm, period, octaves, freq, total)
            out[i] = _warp_mark(total.reshape(-1), *warp).reshape(height, width)
        return out
    return xp.stack(
        [
            _warp_signs(fractal_perlin(perm, period, octaves, height, width, xp), freq, xp).reshape(height, width)
            for perm, period, octaves, freq in _per_image(params)
        ]
    )


def fractal_perlin(perm: np.ndarray, period: float, octaves: int, height: int, width: int, xp: Backend = NUMPY) -> Any:
    """(H, W) float64 sum over octaves k of perlin(x 2^k / period, y 2^k / period) / 2^k, as one
    matrix product L @ R whose left factor has four non-zeros per row and octave: on numpy only those
    are multiplied (`_sparse_rows`, 4 x octaves multiply-adds per pixel instead of one per column of
    L, ~25x fewer at 512 x 384), on torch the dense product runs on the device."""
    columns, weights, right = _fractal_factors(perm, period, octaves, height, width)
    if xp is NUMPY:
        out = np.empty((height, width))
        _sparse_rows(columns, weights, right, out)
        return out
    return xp.asarray(dense_left(columns, weights, len(right))) @ xp.asarray(right)


def dense_left(columns: np.ndarray, weights: np.ndarray, n_columns: int) -> np.ndarray:
    """The left factor as a dense (H, n_columns) matrix, from its non-zeros per row."""
    left = np.zeros((columns.shape[0], n_columns))
    np.add.at(left, (np.arange(columns.shape[0])[:, None], columns), weights)
    return left


@numba.njit(cache=True, nogil=True)
def _sparse_rows(columns: np.ndarray, weights: np.ndarray, right: np.ndarray, out: np.ndarray) -> None:
    """out = L @ right for L given row by row as (columns, weights) of its non-zeros, four per octave.

    Each pixel's sum starts at 0.0 and adds the float64 products in column order; it is rounded once
    to out's dtype (float32 for the marking path, which needs no float64 map). A row's octave adds
    its four terms in one pass over a float64 row that stays in L1 cache, and `right` must be
    C-contiguous: its rows are then contiguous and the pass runs on whole vector registers (a
    strided `right` made this 5x slower)."""
    acc = np.empty(right.shape[1])
    for y in range(columns.shape[0]):
        acc[:] = 0.0
        for j in range(0, columns.shape[1], 4):
            r0, r1, r2, r3 = (
                right[columns[y, j]],
                right[columns[y, j + 1]],
                right[columns[y, j + 2]],
                right[columns[y, j + 3]],
            )
            w0, w1, w2, w3 = weights[y, j], weights[y, j + 1], weights[y, j + 2], weights[y, j + 3]
            for x in range(acc.size):
                acc[x] = acc[x] + w0 * r0[x] + w1 * r1[x] + w2 * r2[x] + w3 * r3[x]
        row = out[y]
        for x in range(acc.size):
            row[x] = acc[x]


def _perlin_map(
    perm: np.ndarray, period: float, octaves: int, freq: float, total: np.ndarray
) -> tuple[np.float32, np.float32, np.float32, bool]:
    """Fill `total` (H, W) float32 with an image's fractal Perlin map (on numpy, with no float64 map
    in memory) and return its warp: the arguments `_warp_mark` and `_inside` take after the map."""
    columns, weights, right = _fractal_factors(perm, period, octaves, *total.shape)
    _sparse_rows(columns, weights, right, total)
    return _warp_params(total.reshape(-1), freq)


def _warp_affine(lo: float, hi: float, freq: float) -> tuple[np.float32, np.float32]:
    """The map from a Perlin value to the warp's phase in periods: scale and offset, float32."""
    scale = np.float32(freq / 2 / max(hi - lo, 1e-12))  # periods of the warp across the range of total
    return scale, np.float32(-lo * float(scale))


def _warp_signs(total: Any, freq: float, xp: Backend) -> Any:
    """+-1 where norm(sin(pi f norm(total))) >= 0.5, without evaluating a sine per pixel.

    With q the phase (in periods) of the warp and c the midpoint of the sine's range over the pixels,
    sin(2 pi q) >= c holds exactly when q lies within w = 1/4 - asin(c) / (2 pi) of 1/4 on the
    circle. The largest sine is cos(2 pi d) with d the smallest circular distance of a phase to 1/4,
    the smallest is -cos(2 pi d') with d' that to 3/4. Per pixel only float32 additions,
    multiplications, floors and comparisons remain: exact IEEE operations, so numpy and torch (CPU
    or CUDA) give the same signs."""
    total = xp.f32(total.reshape(-1))
    if xp is NUMPY:  # the same float32 operations, fused into two passes
        return _warp_mark(total, *_warp_params(total, freq))
    scale, offset = _warp_affine(float(xp.amin(total[None]).item()), float(xp.amax(total[None]).item()), freq)
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


def _warp_params(total: np.ndarray, freq: float) -> tuple[np.float32, np.float32, np.float32, bool]:
    """A flat float32 map's warp on numpy: scale, offset, and the bound and wrap flag of `_inside`."""
    scale, offset = _warp_affine(float(total.min()), float(total.max()), freq)
    width = _arc_width(*(float(x) for x in _warp_stats(total, scale, offset)))
    wraps = width > 0.25
    return scale, offset, np.float32(0.5 - width if wraps else width), wraps


@numba.njit(cache=True, nogil=True)
def _warp_stats(total: np.ndarray, scale: np.float32, offset: np.float32) -> tuple[float, float, float, float]:
    """Smallest and largest distance of a pixel's phase to 1/4 (gap) and to 3/4 (far).

    Kept per lane of 64 pixels and combined at the end: the loop is then elementwise and runs on
    vector registers (one running minimum is a serial chain, 7x slower). Minima and maxima of these
    non-negative values are exact, so the order they are taken in changes nothing."""
    lanes = 64
    stats = np.empty((4, lanes), np.float32)  # gap min, gap max, far min, far max
    stats[0], stats[1], stats[2], stats[3] = np.inf, -np.inf, np.inf, -np.inf
    for start in range(0, total.size, lanes):
        chunk = total[start : start + lanes]
        for i in range(chunk.size):
            phase = _phase(chunk[i], scale, offset)
            gap, far = abs(phase - np.float32(0.25)), abs(phase - np.float32(0.75))
            stats[0, i], stats[1, i] = min(stats[0, i], gap), max(stats[1, i], gap)
            stats[2, i], stats[3, i] = min(stats[2, i], far), max(stats[3, i], far)
    return stats[0].min(), stats[1].max(), stats[2].min(), stats[3].max()


@numba.njit(cache=True, nogil=True)
def _phase(v: np.float32, scale: np.float32, offset: np.float32) -> np.float32:
    """A pixel's warp phase in [0, 1) (float32): where its value falls within a period of the sine."""
    periods = v * scale + offset
    return periods - np.floor(periods)


@numba.njit(cache=True, nogil=True)
def _inside(v: np.float32, scale: np.float32, offset: np.float32, bound: np.float32, wraps: bool) -> bool:
    """Whether a pixel of value v (float32) lies on the warp's arc: its sign is +1."""
    gap = abs(_phase(v, scale, offset) - np.float32(0.25))
    return abs(gap - np.float32(0.5)) >= bound if wraps else gap <= bound


@numba.njit(cache=True, nogil=True)
def _warp_mark(total: np.ndarray, scale: np.float32, offset: np.float32, bound: np.float32, wraps: bool) -> np.ndarray:
    out = np.empty(total.size, np.float32)
    for i, v in enumerate(total):
        out[i] = np.float32(1.0) if _inside(v, scale, offset, bound, wraps) else np.float32(-1.0)
    return out


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
    images: np.ndarray,
    pattern: np.ndarray,
    noise_seeds: np.ndarray,
    cfg: MarkConfig,
    device: str | None = None,
    channels_first: bool = False,
) -> np.ndarray:
    """Mark a batch of one user's images: (B, H, W, 3) uint8 -> (B, H, W, 3) uint8, or (B, 3, H, W)
    with `channels_first` (the layout torch models take, without a transposed copy afterwards).

    Blended in float32 with numpy (`device=None`) or torch on `device`, on the 0..255 scale; the
    noisy image is clipped to the valid range before blending, so the result stays in range and
    rounds to the nearest stored value."""
    xp = get_backend(device)
    b, h, w, _ = images.shape
    # on the 0..255 scale: clip(x + 255 delta), times alpha, plus (1 - alpha) 255 p, rounded
    blend = ((1.0 - cfg.alpha) * 255.0 * np.asarray(pattern, dtype=np.float64)).astype(np.float32)
    if xp is NUMPY and cfg.noise == "perlin":
        out = np.empty((b, 3, h, w) if channels_first else (b, h, w, 3), np.uint8)
        _mark_perlin(images, blend, noise_seeds, cfg, out, channels_first)
        return out
    delta = (
        xp.f32(noise_delta(cfg.noise, noise_seeds, h, w, cfg.epsilon * 255.0, xp))
        if cfg.noise != "none"
        else xp.asarray(np.zeros((b, h, w, 1), np.float32))
    )
    if xp is NUMPY:  # one fused pass instead of six array passes over every channel of every pixel
        out = np.empty_like(images)
        _blend_uint8(images, delta, blend, np.float32(cfg.alpha), out)
    else:
        x = xp.clip(xp.f32(xp.asarray(images)) + delta, 0.0, 255.0)
        out = xp.to_numpy(xp.rint(x * np.float32(cfg.alpha) + xp.asarray(blend)[None])).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)) if channels_first else out


def _mark_perlin(
    images: np.ndarray,
    blend: np.ndarray,
    noise_seeds: np.ndarray,
    cfg: MarkConfig,
    out: np.ndarray,
    channels_first: bool,
) -> None:
    """`mark_batch` for Perlin noise on numpy, image by image: the float32 map, its warp, then one
    pass that finds each pixel's sign and writes its blended channels in `out`'s layout. No float64
    map, noise array or copy is made: the same bytes as the array version, in a ninth of the time."""
    images, total = np.ascontiguousarray(images), np.empty(images.shape[1:3], np.float32)
    blend = np.ascontiguousarray(blend.transpose(2, 0, 1) if channels_first else blend)
    epsilon, alpha = np.float32(cfg.epsilon * 255.0), np.float32(cfg.alpha)
    for i, (perm, period, octaves, freq) in enumerate(_per_image(perlin_params(noise_seeds))):
        warp = _perlin_map(perm, period, octaves, freq, total)
        _mark_image(images[i], total, *warp, epsilon, blend, alpha, out[i], channels_first)


@numba.njit(cache=True, nogil=True)
def _blend_pixel(value: np.uint8, delta: np.float32, alpha: np.float32, blend: np.float32) -> np.uint8:
    """One channel of a marked pixel: clip(x + delta) alpha + blend, rounded (all float32)."""
    noisy = min(max(np.float32(value) + delta, np.float32(0.0)), np.float32(255.0))
    return np.uint8(np.rint(noisy * alpha + blend))


@numba.njit(cache=True, nogil=True)
def _mark_image(
    image: np.ndarray,
    total: np.ndarray,
    scale: np.float32,
    offset: np.float32,
    bound: np.float32,
    wraps: bool,
    epsilon: np.float32,
    blend: np.ndarray,
    alpha: np.float32,
    out: np.ndarray,
    channels_first: bool,
) -> None:
    """One image marked with its Perlin map: per row, each pixel's +-epsilon, then the blend of
    every channel; `blend` and `out` are (3, H, W) with `channels_first`, else (H, W, 3).

    The rows are indexed flat (3 x + c), so that the compiler sees the channels' constant stride
    and runs both layouts on vector registers (2D indexing left them scalar, 8x slower)."""
    height, width = total.shape
    delta = np.empty(3 * width, np.float32)  # channels_first: per pixel; else per channel, as `out`'s row
    pixels = image.reshape(height, 3 * width)
    for y in range(height):
        row = pixels[y]
        if channels_first:
            for x in range(width):
                delta[x] = epsilon if _inside(total[y, x], scale, offset, bound, wraps) else -epsilon
            for x in range(width):
                for c in range(3):
                    out[c, y, x] = _blend_pixel(row[3 * x + c], delta[x], alpha, blend[c, y, x])
        else:
            for x in range(width):
                delta[3 * x] = delta[3 * x + 1] = delta[3 * x + 2] = (
                    epsilon if _inside(total[y, x], scale, offset, bound, wraps) else -epsilon
                )
            out_row, blend_row = out.reshape(height, 3 * width)[y], blend.reshape(height, 3 * width)[y]
            for k in range(3 * width):
                out_row[k] = _blend_pixel(row[k], delta[k], alpha, blend_row[k])


@numba.njit(cache=True, nogil=True)
def _blend_uint8(images: np.ndarray, delta: np.ndarray, blend: np.ndarray, alpha: np.float32, out: np.ndarray) -> None:
    one_delta = delta.shape[3] == 1
    for i in range(images.shape[0]):
        for y in range(images.shape[1]):
            for x in range(images.shape[2]):
                for c in range(3):
                    d = delta[i, y, x, 0] if one_delta else delta[i, y, x, c]
                    out[i, y, x, c] = _blend_pixel(images[i, y, x, c], d, alpha, blend[y, x, c])
