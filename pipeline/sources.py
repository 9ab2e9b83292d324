"""Image sources behind one interface: every source returns RGB uint8 splits on the run's grid.

Sources are looked up in a registry by the config's `data.source` name. The pixel grid is fixed
here (pad or area-resize to `data.image_size`) so that marking later happens on exactly the pixels
that are stored and trained on.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .config import DataConfig
from .registry import Registry


class DataSourceError(RuntimeError):
    """The data cannot be found or read; the message names the path and what to do."""


@dataclass(frozen=True)
class ImageSplits:
    """Train and test images as (N, H, W, 3) uint8 with int64 labels."""

    name: str
    classes: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)


SOURCES: Registry[Callable[[DataConfig], ImageSplits]] = Registry("data.source")


def to_grid(images: np.ndarray, size: int) -> np.ndarray:
    """(N,H,W[,C]) uint8 -> (N,size,size,3): grey becomes RGB, smaller images are zero-padded
    around the centre, larger ones are area-resized (as FFCV does before storing)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, _ = images.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(images)
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((n, size, size, 3), dtype=np.uint8)
        out[:, top : top + h, left : left + w] = images
        return out
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])


def load_source(cfg: DataConfig) -> ImageSplits:
    splits = SOURCES.lookup(cfg.source)(cfg)
    test_images, test_labels = splits.test_images, splits.test_labels
    if cfg.n_test is not None:
        test_images, test_labels = test_images[: cfg.n_test], test_labels[: cfg.n_test]
    return ImageSplits(
        name=splits.name,
        classes=splits.classes,
        train_images=to_grid(splits.train_images, cfg.image_size),
        train_labels=splits.train_labels.astype(np.int64),
        test_images=to_grid(test_images, cfg.image_size),
        test_labels=test_labels.astype(np.int64),
    )


# --- Fashion-MNIST -------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.cache/mtrack/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format MNIST-style datasets ship in."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataSourceError(f"{path}: unreadable IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataSourceError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataSourceError(f"{path}: truncated ({body.size} bytes of data, header says {int(np.prod(dims))})")
    return body.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _download_fashion_mnist(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES.values():
        target = directory / f"{stem}.gz"
        if target.exists():
            continue
        tmp = target.with_suffix(".gz.part")
        try:
            with urllib.request.urlopen(FASHION_MNIST_URL + target.name, timeout=30) as resp, open(tmp, "wb") as fh:
                shutil.copyfileobj(resp, fh)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataSourceError(f"download of {FASHION_MNIST_URL}{target.name} failed ({exc})") from None
        os.replace(tmp, target)


@SOURCES.register("fashion_mnist")
def load_fashion_mnist(cfg: DataConfig) -> ImageSplits:
    candidates = [Path(cfg.root).expanduser()] if cfg.root else [Path(d).expanduser() for d in FASHION_MNIST_DIRS]
    for directory in candidates:
        paths = {k: _find_idx(directory, stem) for k, stem in FASHION_MNIST_FILES.items()}
        if all(paths.values()):
            break
    else:
        if not cfg.download:
            where = " or ".join(str(c) for c in candidates)
            raise DataSourceError(
                f"Fashion-MNIST IDX files not found in {where}; install Debian's dataset-fashion-mnist, "
                "set data.root, or set data.download=true"
            )
        directory = candidates[-1]
        _download_fashion_mnist(directory)
        paths = {k: _find_idx(directory, stem) for k, stem in FASHION_MNIST_FILES.items()}
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataSourceError(f"{paths[f'{split}_labels']}: {n_lab} labels for {n_img} images")
    return ImageSplits("fashion_mnist", FASHION_MNIST_CLASSES, **arrays)


# --- Synthetic ------------------------------------------------------------------------------------

SYNTHETIC_SEED = 20240906


def _synthetic_split(n_per_class: int, n_classes: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class c is an oriented grating with its own angle, frequency and tint; each sample varies in
    phase, contrast, position of a bright blob, and pixel noise, so a model must learn the class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    labels = np.repeat(np.arange(n_classes), n_per_class)
    n = labels.size
    angle = np.pi * labels / n_classes + rng.normal(0, 0.08, n)
    freq = 2.0 + 3.0 * (labels % 4) + rng.normal(0, 0.3, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    contrast = rng.uniform(0.5, 1.0, n)
    proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    grating = 0.5 + 0.5 * contrast[:, None, None] * np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
    cy, cx = rng.uniform(0.2, 0.8, (2, n))
    blob = np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 0.01)
    tint = np.stack([0.5 + 0.5 * np.cos(2 * np.pi * (labels / n_classes + k / 3)) for k in range(3)], axis=-1)
    img = grating[..., None] * (0.4 + 0.6 * tint[:, None, None, :]) + 0.3 * blob[..., None]
    img += rng.normal(0, 0.06, img.shape)
    images = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    order = rng.permutation(n)
    return images[order], labels[order].astype(np.int64)


@SOURCES.register("synthetic")
def make_synthetic(cfg: DataConfig) -> ImageSplits:
    rng = np.random.default_rng(SYNTHETIC_SEED)
    size = cfg.image_size
    train = _synthetic_split(cfg.synthetic_per_class, cfg.synthetic_classes, size, rng)
    test = _synthetic_split(max(cfg.synthetic_per_class // 5, 2), cfg.synthetic_classes, size, rng)
    classes = tuple(f"class-{c}" for c in range(cfg.synthetic_classes))
    return ImageSplits("synthetic", classes, train[0], train[1], test[0], test[1])
