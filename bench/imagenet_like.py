"""An ImageNet-shaped image folder on demand: `OUT/train/<class>/*.JPEG` and `OUT/val/<class>/*.JPEG`.

What matters for the pipeline's cost is the files, not what they show: ImageNet's sizes (the longer
side mostly 500 px, shorter side about 200-500, aspect ratios of photographs, mean near 400 x 350),
JPEG at quality 90 of about 100 KB, and content that compresses and decodes like a photograph. Each
image is a 1/f^2 ("pink") random field -- the power spectrum of natural images -- in a class's
colours, with a few soft-edged shapes and fine grain on top, so JPEG spends its bits on edges and
texture as it does on photographs (white noise would be far larger, flat colour far smaller).
Every file is a function of (seed, split, class, index): the same command gives the same bytes.

    python -m bench.imagenet_like OUT --images 20000 [--per-class 1300] [--val-per-class 50] [--workers 2]
"""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import run_reporting_errors
from pipeline.cli import CommandParser
from pipeline.store import write_json

QUALITY = 90
ASPECTS = (4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9)  # width / height of photographs, landscape
ASPECT_WEIGHTS = (0.5, 0.2, 0.1, 0.1, 0.1)
PORTRAIT = 0.25  # share of images taller than wide


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) as ImageNet's photographs come: the longer side 500 px for most, else
    200-500; a photograph's aspect ratio; one in four portrait."""
    longer = 500 if rng.random() < 0.6 else int(rng.integers(200, 501))
    shorter = max(int(round(longer / rng.choice(ASPECTS, p=ASPECT_WEIGHTS))), 120)
    return (shorter, longer) if rng.random() < PORTRAIT else (longer, shorter)


def pink_fields(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """`n` zero-mean, unit-variance random fields with a 1/f^2 power spectrum (natural-image
    statistics), from one batched FFT."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    amplitude = (1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))).astype(np.float32)
    noise = rng.standard_normal((n, 2, *amplitude.shape), dtype=np.float32)
    fields = np.fft.irfft2(amplitude * (noise[:, 0] + 1j * noise[:, 1]), s=(height, width)).astype(np.float32)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    return fields / (fields.std(axis=(1, 2), keepdims=True) + 1e-12)


def class_palette(seed: int, cls: int) -> np.ndarray:
    """Three colours (RGB in [0, 255]) that a class's images are painted in."""
    return np.random.default_rng([seed, cls, 7]).uniform(30, 225, (3, 3))


def photo_like(seed: int, split: int, cls: int, index: int) -> np.ndarray:
    """One (H, W, 3) uint8 image of class `cls`."""
    rng = np.random.default_rng([seed, split, cls, index])
    width, height = image_size(rng)
    palette = class_palette(seed, cls).astype(np.float32)
    mix_a, mix_b, brightness, texture = pink_fields(rng, 4, height, width)
    # two smooth fields pick a mixture of the class's colours at each pixel; brightness varies slowly
    weights = np.exp(1.5 * np.stack([mix_a, mix_b, np.zeros_like(mix_a)], axis=-1))
    weights /= weights.sum(-1, keepdims=True)
    image = weights @ palette * (1 + 0.25 * brightness)[..., None]
    for _ in range(int(rng.integers(2, 6))):  # objects: soft-edged ellipses in other colours
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.35) * height, rng.uniform(0.05, 0.35) * width
        y0, y1 = int(max(cy - 1.5 * ry, 0)), int(min(cy + 1.5 * ry, height))
        x0, x1 = int(max(cx - 1.5 * rx, 0)), int(min(cx + 1.5 * rx, width))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        inside = 1 / (1 + np.exp(8 * (np.hypot((yy - cy) / ry, (xx - cx) / rx) - 1)))
        colour = rng.uniform(-90, 90, 3).astype(np.float32)
        image[y0:y1, x0:x1] += inside[..., None] * (colour + 25 * texture[y0:y1, x0:x1, None])
    image += rng.normal(0, 6, image.shape).astype(np.float32)  # sensor grain: the fine texture JPEG has to keep
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_one(task: tuple[str, int, int, int, int]) -> tuple[int, int, int]:
    root, seed, split, cls, index = task
    image = photo_like(seed, split, cls, index)
    path = Path(root) / ("train", "val")[split] / f"n{cls:08d}" / f"img_{index:05d}.JPEG"
    Image.fromarray(image).save(path, quality=QUALITY)
    return image.shape[1], image.shape[0], path.stat().st_size


def generate(
    root: Path, images: int, per_class: int = 1300, val_per_class: int = 50, seed: int = 0, workers: int = 2
) -> dict[str, object]:
    """Write about `images` training images (whole classes of `per_class`) and `val_per_class`
    validation images per class under `root`; returns what was written (also in `root/dataset.json`).
    Files already there with the same settings are kept, so an interrupted run continues."""
    n_classes = max(1, math.ceil(images / per_class))
    spec = {
        "images": images,
        "per_class": per_class,
        "val_per_class": val_per_class,
        "seed": seed,
        "quality": QUALITY,
        "classes": n_classes,
    }
    record = root / "dataset.json"
    if record.exists() and json.loads(record.read_text()).get("spec") == spec:
        return json.loads(record.read_text())
    for split in ("train", "val"):
        for cls in range(n_classes):
            (root / split / f"n{cls:08d}").mkdir(parents=True, exist_ok=True)
    tasks = [
        (str(root), seed, split, cls, i)
        for split, count in ((0, per_class), (1, val_per_class))
        for cls in range(n_classes)
        for i in range(count)
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        written = list(pool.map(_write_one, tasks, chunksize=64))
    sizes = np.array(written, dtype=np.float64)
    summary = {
        "spec": spec,
        "train_images": n_classes * per_class,
        "val_images": n_classes * val_per_class,
        "mean_width": round(sizes[:, 0].mean(), 1),
        "mean_height": round(sizes[:, 1].mean(), 1),
        "shorter_side_p5_p95": np.percentile(sizes[:, :2].min(1), [5, 95]).round().tolist(),
        "mean_kb": round(sizes[:, 2].mean() / 1000, 1),
        "total_gb": round(sizes[:, 2].sum() / 1e9, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(record, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m bench.imagenet_like", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write train/ and val/ into")
    parser.add_argument("--images", type=int, default=20_000, help="training images, rounded up to whole classes")
    parser.add_argument("--per-class", type=int, default=1300, help="training images per class (ImageNet: ~1,300)")
    parser.add_argument("--val-per-class", type=int, default=50, help="validation images per class (ImageNet: 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes encoding JPEGs")
    args = parser.parse_args(argv)
    if min(args.images, args.per_class, args.val_per_class, args.workers) < 1:
        print("error: --images, --per-class, --val-per-class and --workers must be at least 1", file=sys.stderr)
        return 2
    summary = generate(args.out, args.images, args.per_class, args.val_per_class, args.seed, args.workers)
    print(
        f"{args.out}: {summary['train_images']:,} training and {summary['val_images']:,} validation images in "
        f"{summary['spec']['classes']} classes, mean {summary['mean_width']:.0f} x {summary['mean_height']:.0f} px, "
        f"{summary['mean_kb']:.0f} KB each ({summary['total_gb']} GB)"
    )
    return 0


if __name__ == "__main__":
    run_reporting_errors(main)
