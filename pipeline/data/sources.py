"""Image sources behind one interface: every source returns RGB uint8 splits on the run's grid.

Sources are looked up in a registry by the config's `data.source` name. The pixel grid is fixed
here (pad or area-resize to `data.image_size`) so that marking later happens on exactly the pixels
that are stored and trained on.

Small datasets (Fashion-MNIST, CIFAR, synthetic) are decoded into memory. An image-folder dataset
(ImageNet, Tiny ImageNet) is not: its splits are `ImageFiles`, array-likes that know every file
and label up front and decode an image only when it is indexed, so planning reads no pixels,
marking decodes only the users' images and writing streams the files through FFCV's workers.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..config import DataConfig
from ..registry import Registry
from .images import IMAGE_SUFFIXES, fit_to_grid, read_rgb


class DataSourceError(RuntimeError):
    """The data cannot be found or read; the message names the path and what to do."""


class ImageFiles:
    """Image files as a lazy (N, size, size, 3) uint8 array: indexing decodes (EXIF-upright RGB)
    and puts the image on the grid as `to_grid` does. An integer gives one image, a list or
    array of integers a stacked batch, and a slice another lazy view (as numpy slices are views).
    `originals()` is the same files decoded as they are, at their own size, for the writer."""

    def __init__(self, root: Path, files: Sequence[str], size: int, on_grid: bool = True) -> None:
        self.root, self.files, self.size, self.on_grid = root, files, size, on_grid

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.size, self.size, 3)

    def _decode(self, i: int) -> np.ndarray:
        image = read_rgb(self.root / self.files[i])
        return to_grid(image[None], self.size)[0] if self.on_grid else image

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray | ImageFiles:
        if isinstance(index, slice):
            return ImageFiles(self.root, self.files[index], self.size, self.on_grid)
        if np.ndim(index) == 0:
            return self._decode(int(index))
        batch = [self._decode(int(i)) for i in np.asarray(index).reshape(-1)]
        return np.stack(batch) if batch else np.zeros((0, self.size, self.size, 3), np.uint8)

    def originals(self) -> ImageFiles:
        return ImageFiles(self.root, self.files, self.size, on_grid=False)


ImageArray = np.ndarray | ImageFiles


def full_resolution(images: ImageArray) -> ImageArray:
    """The images as a writer should store clean ones: file-backed images at their own size (FFCV's
    writer shrinks them to `data.max_resolution`); in-memory sources only exist on the grid."""
    return images.originals() if isinstance(images, ImageFiles) else images


class StoredImages:
    """Images on the pixels the write stage stores, before JPEG-or-raw encoding: the grid, or with
    `max_resolution` each image at its own size (file-backed sources: decoded from the file) with
    the longer side shrunk to it by `fit_to_grid`, as FFCV's writer would. The mark stage marks
    these very pixels and the writer stores them, so a marked image has the size of the clean one
    it replaces. Indexing by one integer decodes one image; `take` gives a list (sizes may differ)."""

    def __init__(self, images: ImageArray, max_resolution: int | None) -> None:
        self.images = images if max_resolution is None else full_resolution(images)
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return fit_to_grid(self.images[int(index)], self.max_resolution)

    def take(self, indices: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        return [self[int(i)] for i in np.asarray(indices).reshape(-1)]


@dataclass(frozen=True)
class ImageSplits:
    """Train and test images as (N, H, W, 3) uint8 arrays (or lazy `ImageFiles`) with int64 labels."""

    name: str
    classes: tuple[str, ...]
    train_images: ImageArray
    train_labels: np.ndarray
    test_images: ImageArray
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


def _on_grid(images: ImageArray, size: int) -> ImageArray:
    return images if isinstance(images, ImageFiles) else to_grid(images, size)


def _take(images: ImageArray, index: np.ndarray) -> ImageArray:
    """The images at `index`, lazily for files (an index array would decode them all)."""
    if isinstance(images, ImageFiles):
        return ImageFiles(images.root, [images.files[i] for i in index], images.size, images.on_grid)
    return images[index]


def restrict_classes(splits: ImageSplits, wanted: tuple[str | int, ...]) -> ImageSplits:
    """Only the `wanted` classes (names, case-insensitive, or indices), relabelled 0..n-1 in the
    source's class order: a task without classes that would be trivially easy."""
    names = [c.lower() for c in splits.classes]
    keep = set()
    for c in wanted:
        index = c if isinstance(c, int) else names.index(c.lower()) if c.lower() in names else -1
        if not 0 <= index < len(names):
            raise DataSourceError(f"data.classes: {c!r} is not a class of {splits.name} ({', '.join(splits.classes)})")
        if index in keep:  # ["trouser", 1] or [3, 3]: a typo, not a wish to keep fewer classes
            raise DataSourceError(f"data.classes: {c!r} names class {index} ({splits.classes[index]}) a second time")
        keep.add(index)
    old = np.array(sorted(keep))
    if len(old) < 2:
        raise DataSourceError("data.classes: keep at least two classes")
    relabel = np.full(len(names), -1, np.int64)
    relabel[old] = np.arange(len(old))
    train, test = np.flatnonzero(np.isin(splits.train_labels, old)), np.flatnonzero(np.isin(splits.test_labels, old))
    return ImageSplits(
        splits.name,
        tuple(splits.classes[i] for i in old),
        _take(splits.train_images, train),
        relabel[splits.train_labels[train]],
        _take(splits.test_images, test),
        relabel[splits.test_labels[test]],
    )


def load_source(cfg: DataConfig) -> ImageSplits:
    splits = SOURCES.lookup(cfg.source)(cfg)
    if cfg.classes:
        splits = restrict_classes(splits, cfg.classes)
    test_images, test_labels = splits.test_images, splits.test_labels
    if cfg.n_test is not None:
        test_images, test_labels = test_images[: cfg.n_test], test_labels[: cfg.n_test]
    return ImageSplits(
        name=splits.name,
        classes=splits.classes,
        train_images=_on_grid(splits.train_images, cfg.image_size),
        train_labels=splits.train_labels.astype(np.int64),
        test_images=_on_grid(test_images, cfg.image_size),
        test_labels=test_labels.astype(np.int64),
    )


# --- Fashion-MNIST -------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
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


SYNTHETIC_CHUNK = 256  # images computed at a time: the float64 temporaries stay a few MB whatever the size


def _synthetic_split(
    n_per_class: int, n_classes: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Class c is an oriented grating with its own angle, frequency and tint; each sample varies in
    phase, contrast, position of a bright blob, and pixel noise, so a model must learn the class.
    Computed in chunks (the pixel noise drawn chunk after chunk is the same stream as drawn at once)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    labels = np.repeat(np.arange(n_classes), n_per_class)
    n = labels.size
    angle = np.pi * labels / n_classes + rng.normal(0, 0.08, n)
    freq = 2.0 + 3.0 * (labels % 4) + rng.normal(0, 0.3, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    contrast = rng.uniform(0.5, 1.0, n)
    cy, cx = rng.uniform(0.2, 0.8, (2, n))
    tint = np.stack([0.5 + 0.5 * np.cos(2 * np.pi * (labels / n_classes + k / 3)) for k in range(3)], axis=-1)
    images = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, SYNTHETIC_CHUNK):
        i = slice(start, start + SYNTHETIC_CHUNK)
        proj = np.cos(angle[i])[:, None, None] * xx + np.sin(angle[i])[:, None, None] * yy
        grating = 0.5 + 0.5 * contrast[i, None, None] * np.sin(
            2 * np.pi * freq[i, None, None] * proj + phase[i, None, None]
        )
        blob = np.exp(-((yy - cy[i, None, None]) ** 2 + (xx - cx[i, None, None]) ** 2) / 0.01)
        img = grating[..., None] * (0.4 + 0.6 * tint[i, None, None, :]) + 0.3 * blob[..., None]
        img += rng.normal(0, 0.06, img.shape)
        images[i] = np.clip(np.rint(img * 255), 0, 255)
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


# --- Image folders (ImageNet, Tiny ImageNet, ...) ----------------------------------------------------

IMAGEFOLDER_HINT = "pass --set data.root=/path/to/dataset (a folder holding train/ and val/ class folders)"


def _image_files(folder: Path) -> list[str]:
    """Image files under `folder`, recursively, as sorted POSIX paths relative to it."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [
            os.path.relpath(os.path.join(parent, n), folder)
            for n in names
            if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
        ]
    return sorted(Path(f).as_posix() for f in found)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _labelled_split(split_dir: Path, classes: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Files of a class-folder split (`split/<class>/**/image`), sorted by class, then path."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in _class_folders(split_dir) if c not in index]
    if unknown:
        raise DataSourceError(f"{split_dir / unknown[0]}: class folder not in train/ ({len(unknown)} such folders)")
    files, labels = [], []
    for name in classes:
        if (split_dir / name).is_dir():
            found = _image_files(split_dir / name)
            files += [f"{split_dir.name}/{name}/{f}" for f in found]
            labels += [index[name]] * len(found)
    return files, np.array(labels, dtype=np.int64)


def _annotated_split(split_dir: Path, classes: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Tiny ImageNet's validation layout: `val/images/*` with `val/val_annotations.txt` giving each
    file's class (tab-separated: file, class, box); sorted by class, then path."""
    annotations = split_dir / "val_annotations.txt"
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, cls = (line.split("\t") + [""])[:2]
        if cls not in index:
            raise DataSourceError(f"{annotations}:{number}: class '{cls}' is not a folder of train/")
        if not (split_dir / "images" / name).is_file():
            raise DataSourceError(f"{annotations}:{number}: {split_dir / 'images' / name} does not exist")
        rows.append((cls, f"images/{name}"))
    rows.sort()
    return [f"{split_dir.name}/{path}" for _, path in rows], np.array([index[c] for c, _ in rows], dtype=np.int64)


@SOURCES.register("imagefolder")
def load_imagefolder(cfg: DataConfig) -> ImageSplits:
    """`root/train/<class>/**/image` and either `root/val/<class>/**/image` (ImageNet as torchvision
    lays it out) or Tiny ImageNet's `root/val/images` + `val_annotations.txt`. Classes are the train
    folder names, sorted; images are decoded lazily (see `ImageFiles`)."""
    if cfg.root is None:
        raise DataSourceError(f"data.source imagefolder needs data.root: {IMAGEFOLDER_HINT}")
    root = Path(cfg.root).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    for needed in (train_dir, val_dir):
        if not needed.is_dir():
            raise DataSourceError(f"{needed}: not found; {IMAGEFOLDER_HINT}")
    classes = tuple(_class_folders(train_dir))
    if not classes:
        raise DataSourceError(f"{train_dir}: no class folders; {IMAGEFOLDER_HINT}")
    train_files, train_labels = _labelled_split(train_dir, classes)
    split_reader = _annotated_split if (val_dir / "val_annotations.txt").is_file() else _labelled_split
    test_files, test_labels = split_reader(val_dir, classes)
    for split_dir, files in ((train_dir, train_files), (val_dir, test_files)):
        if not files:
            raise DataSourceError(f"{split_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageSplits(
        root.name,
        classes,
        ImageFiles(root, train_files, cfg.image_size),
        train_labels,
        ImageFiles(root, test_files, cfg.image_size),
        test_labels,
    )


# --- CIFAR (the python pickle archives) -------------------------------------------------------------


@dataclass(frozen=True)
class CifarArchive:
    """Where a CIFAR variant keeps its batches inside the extracted `*-python.tar.gz`."""

    folder: str
    train_batches: tuple[str, ...]
    test_batch: str
    meta: str
    label_key: bytes
    names_key: bytes


CIFAR_ARCHIVES = {
    "cifar10": CifarArchive(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": CifarArchive("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    """One batch of the official archive (a pickled dict with bytes keys). Pickle runs code from the
    file: point data.root only at archives from the official source."""
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except FileNotFoundError:
        raise DataSourceError(f"{path}: missing from the CIFAR archive") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataSourceError(f"{path}: not a CIFAR python batch ({exc})") from None


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    try:
        rows, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
    except KeyError as exc:
        raise DataSourceError(f"{path}: no {exc.args[0]!r} entry") from None
    if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32 or len(rows) != len(labels):
        raise DataSourceError(f"{path}: expected (N, 3072) pixels and N labels, got {rows.shape} and {len(labels)}")
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar(cfg: DataConfig, name: str) -> ImageSplits:
    archive = CIFAR_ARCHIVES[name]
    if cfg.root is None:
        raise DataSourceError(f"data.source {name} needs data.root: the folder holding {archive.folder}/")
    root = Path(cfg.root).expanduser()
    folder = root / archive.folder if (root / archive.folder).is_dir() else root
    if not (folder / archive.meta).is_file():
        raise DataSourceError(
            f"{folder / archive.meta}: not found; data.root must hold the extracted {archive.folder}/"
        )
    train = [_cifar_batch(folder / b, archive.label_key) for b in archive.train_batches]
    test_images, test_labels = _cifar_batch(folder / archive.test_batch, archive.label_key)
    classes = tuple(n.decode() for n in _unpickle(folder / archive.meta)[archive.names_key])
    return ImageSplits(
        name,
        classes,
        np.concatenate([t[0] for t in train]),
        np.concatenate([t[1] for t in train]),
        test_images,
        test_labels,
    )


for _variant in CIFAR_ARCHIVES:
    SOURCES.register(_variant)(lambda cfg, _variant=_variant: _load_cifar(cfg, _variant))
