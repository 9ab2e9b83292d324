"""Loader throughput: our FFCV training loader against torchvision's ImageFolder + DataLoader.

Both read the same generated ImageNet-style folder of JPEGs and produce the same batches: uint8
NCHW images, random-resized crop to 160 px plus horizontal flip, with the same batch size and the
same number of workers, taking turns within each repeat so machine load hits them alike.
- ours: the folder written by the write stage's `write_beton` (clean images at their own size,
  re-encoded JPEG q90 or raw) and read by `make_loader` (FFCV, numba-compiled decode and crop);
- baseline: `torchvision.datasets.ImageFolder` (PIL decode of the original files) with
  `RandomResizedCrop(160)`, `RandomHorizontalFlip`, `PILToTensor` in DataLoader workers.
Run `python -m bench.loader` from the repository root; it writes results/bench/loader.json and the
`loader.json` line of results/bench/README.md.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2

from bench.common import comparison, interleaved_medians, publish, run_reporting_errors, write_jpeg_folder
from pipeline.config import DataConfig
from pipeline.data.betons import ImageStorage, make_loader, write_beton
from pipeline.data.sources import full_resolution, load_source

CLASSES, PER_CLASS, SIZES = 10, 200, ((320, 240), (240, 320), (300, 300))
RESOLUTION, BATCH, WORKERS, REPEATS = 160, 64, 2, 3


def torchvision_loader(root: Path) -> torch.utils.data.DataLoader:
    transform = v2.Compose([v2.RandomResizedCrop(RESOLUTION), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True)


def _rate(loader: Iterable) -> float:
    start, count = time.perf_counter(), 0
    for images, *_ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        write_jpeg_folder(root, "train", CLASSES, PER_CLASS, SIZES)
        write_jpeg_folder(root, "val", CLASSES, 1, SIZES, seed=1)
        data = load_source(DataConfig(source="imagefolder", root=str(root), image_size=RESOLUTION, n_train=10))
        images, n = full_resolution(data.train_images), len(data.train_labels)
        sides: dict[str, Iterable] = {"torchvision": torchvision_loader(root)}
        for mode in ("jpg", "raw"):
            beton = Path(tmp) / f"{mode}.beton"
            write_beton(
                beton,
                images,
                data.train_labels,
                np.arange(n),
                num_workers=WORKERS,
                storage=ImageStorage(mode=mode, jpeg_quality=90),
            )
            sides[mode] = make_loader(beton, BATCH, WORKERS, train=True, augment="flip", resolution=RESOLUTION)
        for loader in sides.values():  # warm-up epoch: numba compilation of FFCV's pipeline, page cache
            _rate(loader)
        # one epoch each per round; loaders are built once, as in training
        median = interleaved_medians(
            {name: (lambda loader=loader: _rate(loader)) for name, loader in sides.items()}, REPEATS
        )
    where = f"{n} JPEGs of ~300 px, random-resized crop {RESOLUTION} + flip, batch {BATCH}, {WORKERS} workers"
    for mode, stored in (("jpg", "JPEG q90"), ("raw", "raw pixels")):
        rows.append(
            comparison(f"FFCV ({stored}) vs torchvision ImageFolder, {where}", median[mode], median["torchvision"])
        )
    publish(
        "loader.json",
        rows,
        (
            f"- `loader.json` — training loader throughput ({where}; a shared 2-core machine): FFCV from JPEG "
            f"{rows[0]['ratio']:.2f}× torchvision ImageFolder + DataLoader ({median['jpg']:.0f} vs "
            f"{median['torchvision']:.0f} img/s), from raw pixels {rows[1]['ratio']:.2f}× ({median['raw']:.0f} img/s)"
        ),
    )


if __name__ == "__main__":
    run_reporting_errors(main)
