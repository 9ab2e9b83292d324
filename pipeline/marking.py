"""The MembershipTracker mark, vectorised over a batch of images.

Step 1 adds a binary perturbation delta = sign(n - 0.5) * epsilon, where n is a sin-warped Perlin
map drawn per image (or i.i.d. signs for `uniform`), and clips to [0, 1]. Step 2 blends with the
user's pattern: x' = alpha * (x + delta) + (1 - alpha) * p. Every random choice comes from seeds,
so the same seeds give bit-identical marks.
"""
from __future__ import annotations

import numpy as np

from .config import MarkConfig

# Common colours (RGB, 0-255) for stripes; compressed to c/8 + 128 so every channel lies in
# [128, 160): a low-contrast wash the model can memorise without it dominating the image.
STRIPE_PALETTE = np.array(
    [
        (255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
        (255, 255, 255), (0, 0, 0), (255, 165, 0), (128, 0, 128), (255, 192, 203), (165, 42, 42),
        (128, 128, 128), (0, 0, 128), (128, 128, 0), (0, 128, 128),
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


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _perlin(x: np.ndarray, y: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """2-D gradient noise at (x, y) of shape (B, P) with one 512-entry permutation table per image."""
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    xi, yi = x0.astype(np.int64) & 255, y0.astype(np.int64) & 255

    def corner_hash(dx: int, dy: int) -> np.ndarray:
        a = np.take_along_axis(perm, xi + dx, axis=1)
        return np.take_along_axis(perm, a + yi + dy, axis=1) & 7

    def dot(h: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        g = _GRADIENTS[h]
        return g[..., 0] * dx + g[..., 1] * dy

    u, v = _fade(fx), _fade(fy)
    n00 = dot(corner_hash(0, 0), fx, fy)
    n10 = dot(corner_hash(1, 0), fx - 1, fy)
    n01 = dot(corner_hash(0, 1), fx, fy - 1)
    n11 = dot(corner_hash(1, 1), fx - 1, fy - 1)
    return (n00 + u * (n10 - n00)) + v * ((n01 + u * (n11 - n01)) - (n00 + u * (n10 - n00)))


def _minmax(a: np.ndarray) -> np.ndarray:
    lo = a.min(axis=1, keepdims=True)
    hi = a.max(axis=1, keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-12)


def perlin_signs(seeds: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H, W) array of +-1: sign(n - 0.5) of a sin-warped fractal Perlin map, one per seed.

    Per image, a generator seeded by its seed draws the permutation table, the period in [30, 59],
    the octave count in [1, 4] and the warp frequency f in [20, 59]; n = norm(sin(pi f norm(perlin)))."""
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1)
    b = seeds.size
    perms = np.empty((b, 512), dtype=np.int64)
    period = np.empty(b)
    octaves = np.empty(b, dtype=np.int64)
    freq = np.empty(b)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        p = rng.permutation(256)
        perms[i] = np.concatenate([p, p])
        period[i] = rng.integers(30, 60)
        octaves[i] = rng.integers(1, 5)
        freq[i] = rng.integers(20, 60)
    yy, xx = np.mgrid[0:height, 0:width]
    x = xx.reshape(1, -1) / period[:, None]
    y = yy.reshape(1, -1) / period[:, None]
    total = np.zeros((b, height * width))
    for octave in range(int(octaves.max())):
        scale = 2.0**octave  # lacunarity 2, persistence 0.5
        active = (octave < octaves)[:, None]
        total += np.where(active, _perlin(x * scale, y * scale, perms) / scale, 0.0)
    warped = _minmax(np.sin(np.pi * freq[:, None] * _minmax(total)))
    return np.where(warped >= 0.5, 1.0, -1.0).astype(np.float32).reshape(b, height, width)


def uniform_signs(seeds: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H, W, 3) i.i.d. +-1 per pixel and channel, one generator per seed."""
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1)
    out = np.empty((seeds.size, height, width, 3), dtype=np.float32)
    for i, seed in enumerate(seeds):
        out[i] = np.random.default_rng(int(seed)).integers(0, 2, (height, width, 3)) * 2.0 - 1.0
    return out


def noise_delta(kind: str, seeds: np.ndarray, height: int, width: int, epsilon: float) -> np.ndarray:
    """Step 1's perturbation, (B, H, W, 3) float32 with every entry in {-epsilon, 0, +epsilon}."""
    if kind == "perlin":
        return (epsilon * perlin_signs(seeds, height, width))[..., None].repeat(3, axis=-1)
    if kind == "uniform":
        return epsilon * uniform_signs(seeds, height, width)
    if kind == "none":
        return np.zeros((len(seeds), height, width, 3), dtype=np.float32)
    raise ValueError(f"mark.noise: unknown noise '{kind}'")


def mark_batch(images: np.ndarray, pattern: np.ndarray, noise_seeds: np.ndarray, cfg: MarkConfig) -> np.ndarray:
    """Mark a batch of one user's images: (B, H, W, 3) uint8 -> (B, H, W, 3) uint8.

    Computed in float32 on [0, 1]; the noisy image is clipped to [0, 1] before blending, so the
    result stays in range and rounds to the nearest stored value."""
    x = images.astype(np.float32) / 255.0
    _, h, w, _ = images.shape
    noisy = np.clip(x + noise_delta(cfg.noise, noise_seeds, h, w, cfg.epsilon), 0.0, 1.0)
    marked = cfg.alpha * noisy + (1.0 - cfg.alpha) * pattern[None]
    return np.clip(np.rint(marked * 255.0), 0, 255).astype(np.uint8)
