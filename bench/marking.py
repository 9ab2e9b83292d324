"""Marking throughput per core: our batched `mark_batch` against the official per-pixel Perlin loop.

MembershipTracker's released code evaluates `noise.pnoise2` once per pixel in a Python double loop;
`mark_batch` evaluates a map of the same kind for a whole batch with array operations. Both sides
draw each image's parameters with `perlin_params` and the images of our batch repeat the baseline's
seeds, so both do the same work per image. Run `python -m bench.marking` from the repository root;
it writes results/bench/marking.json and the `marking.json` line of results/bench/README.md.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one core; must happen before numpy and torch start their thread pools
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"

import functools  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any

import numpy as np  # noqa: E402
import torch  # noqa: E402
from noise import pnoise2  # noqa: E402

from bench.common import machine, publish, run_reporting_errors  # noqa: E402
from pipeline.config import MarkConfig  # noqa: E402
from pipeline.core.marking import mark_batch, perlin_params, stripe_pattern  # noqa: E402

# Our permutation tables wrap the lattice every 256 cells; pnoise2 is told to wrap there too.
LATTICE_REPEAT = 256
# Image side -> (baseline images, how many times our batch repeats them), sized so the whole run
# stays well under a minute on one core of a slow machine.
SIZES = {32: (128, 4), 64: (48, 3), 224: (12, 2)}
REPEATS = 5
CUDA_REPEAT = 16  # the GPU needs larger batches to be measured rather than its launch overhead


def official_perlin_map(height: int, width: int, period: float, octaves: int, base: int) -> np.ndarray:
    """Fractal Perlin noise (lacunarity 2, persistence 0.5) at pixel / period, one `pnoise2` call
    per pixel as in the official code: (H, W) float64, before any normalisation."""
    out = np.empty((height, width))
    for row in range(height):
        for col in range(width):
            out[row, col] = pnoise2(
                col / period,
                row / period,
                octaves=octaves,
                lacunarity=2.0,
                repeatx=LATTICE_REPEAT,
                repeaty=LATTICE_REPEAT,
                base=base,
            )
    return out


def _minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / max(a.max() - a.min(), 1e-12)


def official_noise_delta(seeds: np.ndarray, height: int, width: int, epsilon: float) -> np.ndarray:
    """(B, H, W, 1) of +-epsilon, one image at a time: normalise the Perlin map, warp it with
    sin(pi * freq * n), normalise again and threshold at 0.5.

    `pnoise2` has one fixed permutation table that `base` offsets, so the image's own table enters
    only as base = perm[0]: the cost per image is ours, the maps differ from ours pixel by pixel."""
    params = perlin_params(seeds)
    out = np.empty((len(params["period"]), height, width, 1))
    for i, (perm, period, octaves, freq) in enumerate(
        zip(params["perm"], params["period"], params["octaves"], params["freq"])
    ):
        raw = official_perlin_map(height, width, float(period), int(octaves), int(perm[0]))
        warped = _minmax(np.sin(np.pi * freq * _minmax(raw)))
        out[i, ..., 0] = np.where(warped >= 0.5, epsilon, -epsilon)
    return out


def official_mark_batch(
    images: np.ndarray, pattern: np.ndarray, noise_seeds: np.ndarray, cfg: MarkConfig
) -> np.ndarray:
    """The baseline: reproduces the official per-pixel approach (a Python loop over pixels calling
    `noise.pnoise2`, image by image), then clips and blends exactly like `mark_batch`.

    Same arguments and result as `mark_batch(images, pattern, noise_seeds, cfg)` for Perlin noise."""
    _, h, w, _ = images.shape
    delta = official_noise_delta(noise_seeds, h, w, cfg.epsilon).astype(np.float32)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        noisy = np.clip(image.astype(np.float32) / 255.0 + delta[i], 0.0, 1.0)
        marked = cfg.alpha * noisy + (1.0 - cfg.alpha) * pattern
        out[i] = np.clip(np.rint(marked * 255.0), 0, 255).astype(np.uint8)
    return out


def _images_per_second(mark: Callable[[], np.ndarray], n_images: int) -> float:
    start = time.perf_counter()
    mark()
    return n_images / (time.perf_counter() - start)


def _marker(side: str | None) -> Callable[..., np.ndarray]:
    """The function one side marks with: the baseline, or `mark_batch` on a device (None: numpy)."""
    return official_mark_batch if side == "baseline" else functools.partial(mark_batch, device=side)


def run(repeats: int = REPEATS) -> list[dict[str, Any]]:
    """Median images/s of every side per size, measured alternately within each repeat so that
    load from other processes hits all sides alike."""
    cfg = MarkConfig(noise="perlin")
    devices = [None] + (["cuda"] if torch.cuda.is_available() else [])
    rng = np.random.default_rng(0)
    batches: dict[tuple[int, str | None], tuple[np.ndarray, np.ndarray]] = {}
    for size, (n_base, tile) in SIZES.items():
        seeds = np.arange(n_base, dtype=np.uint64)
        for side, copies in (("baseline", 1), (None, tile), ("cuda", CUDA_REPEAT)):
            if side == "baseline" or side in devices:
                images = rng.integers(0, 256, (n_base * copies, size, size, 3), dtype=np.uint8)
                batches[size, side] = images, np.tile(seeds, copies)
    patterns = {size: stripe_pattern(0, size, size) for size in SIZES}
    for (size, side), (images, seeds) in batches.items():  # warm-up: allocation, CUDA kernel loading
        if side != "baseline":
            mark_batch(images[:2], patterns[size], seeds[:2], cfg, side)
    rates: dict[tuple[int, str | None], list[float]] = {key: [] for key in batches}
    for _ in range(repeats):
        for (size, side), (images, seeds) in batches.items():
            mark = functools.partial(_marker(side), images, patterns[size], seeds, cfg)
            rates[size, side].append(_images_per_second(mark, len(images)))
    rows = []
    for device in devices:
        for size in SIZES:
            ours, baseline = statistics.median(rates[size, device]), statistics.median(rates[size, "baseline"])
            name = f"mark {size}x{size} " + ("perlin, 1 core" if device is None else f"torch-{device}")
            rows.append({"case": name, "ours": ours, "baseline": baseline, "unit": "img/s", "ratio": ours / baseline})
    return rows


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def readme_line(rows: list[dict[str, Any]]) -> str:
    """The README summary of marking.json, largest images first, CPU rows before GPU rows."""
    parsed = [(re.fullmatch(r"mark (\d+)x(\d+) (.+)", row["case"]), row) for row in rows]
    parsed.sort(key=lambda m_row: ("torch-" in m_row[0][3], -int(m_row[0][1])))
    parts = []
    for match, row in parsed:
        label = f"{match[1]}²" if match[1] == match[2] else f"{match[1]}×{match[2]}"
        if "torch-" in match[3]:
            label += " " + match[3]
        parts.append(
            f"{label}: {row['ratio']:.1f}× (ours {_rate(row['ours'])} img/s vs {_rate(row['baseline'])} img/s)"
        )
    return (
        "- `marking.json` — marking throughput per core vs the official per-pixel Perlin (noise.pnoise2): "
        + "; ".join(parts)
    )


def main() -> None:
    torch.set_num_threads(1)
    rows = run()
    description = machine() + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    publish("marking.json", rows, readme_line(rows), description)


if __name__ == "__main__":
    run_reporting_errors(main)
