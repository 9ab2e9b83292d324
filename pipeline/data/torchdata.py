"""A plain PyTorch DataLoader over the same `.beton` files, with the FFCV loader's semantics.

The fallback for machines where FFCV's compiled pipeline is not wanted (`train.loader: torch`):
records are read with FFCV's `Reader` (header, metadata, allocation table) from a memory map and
decoded per sample in DataLoader workers (raw pixels copied, JPEG decoded with OpenCV). What is
kept identical to `betons.make_loader`:
- the order: sequential for evaluation, for training numpy's permutation seeded by seed + epoch,
  and with `distributed` torch's DistributedSampler over the same indices (what FFCV uses);
- batches: last partial batch dropped in training, kept in evaluation;
- augmentation semantics: per-sample flip (p = 0.5) and zero-padded translation, or FFCV's own
  random-resized / centre crop parameters with OpenCV's area resize (as libffcv);
- the output: (uint8 NCHW channels-last images, labels, sample ids, user ids).
Random draws differ from FFCV's (each worker has its own generator), so augmented pixels do too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, get_center_crop, get_random_crop
from ffcv.reader import Reader
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from ..store import StageError
from .betons import EVAL_CROP_RATIO, FIELDS, EpochPosition

RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # FFCV's RandomResizedCropRGBImageDecoder defaults


class BetonRecords(Dataset):
    """Record i of a beton as (HWC uint8 image, label, sample, user), augmented when training."""

    def __init__(self, path: Path, *, train: bool, augment: str, translate_pixels: int, resolution: int | None) -> None:
        reader = Reader(str(path))
        column = {name: f"f{i}" for i, name in enumerate(reader.field_names)}
        self.path = path
        self.image_meta = np.array(reader.metadata[column["image"]])
        self.ints = {k: np.array(reader.metadata[column[k]]) for k in FIELDS[1:]}
        order = np.argsort(reader.alloc_table["ptr"])
        self.ptrs, self.sizes = reader.alloc_table["ptr"][order], reader.alloc_table["size"][order]
        self.train, self.augment, self.pad, self.resolution = train, augment, translate_pixels, resolution
        self._data: np.memmap | None = None  # opened in each worker

    def __len__(self) -> int:
        return len(self.image_meta)

    def encoded(self, i: int) -> tuple[int, int, int, np.ndarray]:
        """Record i's image as the file holds it: mode (FFCV's IMAGE_MODES), height, width, bytes."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        meta = self.image_meta[i]
        ptr = int(meta["data_ptr"])
        size = int(self.sizes[np.searchsorted(self.ptrs, ptr)])
        return int(meta["mode"]), int(meta["height"]), int(meta["width"]), self._data[ptr : ptr + size]

    def decoded(self, i: int) -> np.ndarray:
        """Record i's image as stored, (H, W, 3) uint8: raw pixels, or JPEG decoded with OpenCV."""
        mode, height, width, data = self.encoded(i)
        if mode == IMAGE_MODES["jpg"]:
            return cv2.cvtColor(cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return np.array(data[: height * width * 3]).reshape(height, width, 3)

    def _crop(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if self.train:
            top, left, ch, cw = get_random_crop(h, w, RRC_SCALE, RRC_RATIO)
        else:
            top, left, ch, cw = get_center_crop(h, w, None, EVAL_CROP_RATIO)
        size = (self.resolution, self.resolution)
        return cv2.resize(image[top : top + ch, left : left + cw], size, interpolation=cv2.INTER_AREA)

    def _augment(self, image: np.ndarray) -> np.ndarray:
        if self.augment in ("flip", "flip_translate") and np.random.rand() < 0.5:
            image = image[:, ::-1]
        if self.augment == "flip_translate" and self.pad > 0:
            h, w = image.shape[:2]
            padded = np.zeros((h + 2 * self.pad, w + 2 * self.pad, 3), np.uint8)
            padded[self.pad : self.pad + h, self.pad : self.pad + w] = image
            y, x = np.random.randint(0, 2 * self.pad + 1, size=2)
            image = padded[y : y + h, x : x + w]
        return np.ascontiguousarray(image)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int, int]:
        image = self.decoded(i)
        if self.resolution is not None:
            image = self._crop(image)
        if self.train:
            image = self._augment(image)
        return image, int(self.ints["label"][i]), int(self.ints["sample"][i]), int(self.ints["user"][i])


class EpochOrder(Sampler[int]):
    """FFCV's traversal order of `indices` for the epoch set in `epoch`."""

    def __init__(self, indices: np.ndarray, *, shuffle: bool, seed: int, distributed: bool) -> None:
        self.indices, self.shuffle, self.seed, self.epoch = indices, shuffle, seed, 0
        self.sampler = DistributedSampler(indices, shuffle=shuffle, seed=seed, drop_last=False) if distributed else None

    def order(self) -> np.ndarray:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
            return self.indices[np.array(list(self.sampler), dtype=np.int64)]
        if self.shuffle:
            return np.random.default_rng(self.seed + self.epoch).permutation(self.indices)
        return self.indices

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


def _collate(batch: list[tuple[np.ndarray, int, int, int]]) -> tuple[torch.Tensor, ...]:
    images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
    return (images, *(torch.tensor([b[k] for b in batch], dtype=torch.int64) for k in (1, 2, 3)))


class TorchBetonLoader(EpochPosition):
    """The DataLoader with `BetonLoader`'s interface: `epoch` set by the caller picks the order."""

    def __init__(self, loader: DataLoader, order: EpochOrder) -> None:
        self.loader, self.order = loader, order

    @property
    def num_samples(self) -> int:
        return len(self.order)

    def __len__(self) -> int:
        return len(self.loader)

    def set_resolution(self, resolution: int) -> None:
        """Crop size of the next epochs (workers are started anew each epoch and pick it up)."""
        if self.loader.dataset.resolution is None:
            raise StageError("progressive resizing needs train.resolution (cropping)")
        self.loader.dataset.resolution = resolution

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.order.epoch = self.epoch
        yield from self._from_position(iter(self.loader))


def make_torch_loader(
    path: str | Path,
    batch_size: int,
    num_workers: int,
    *,
    train: bool,
    augment: str = "none",
    translate_pixels: int = 0,
    seed: int = 0,
    distributed: bool = False,
    indices: Sequence[int] | None = None,
    torch_threads: int | None = None,
    resolution: int | None = None,
) -> TorchBetonLoader:
    """Same arguments and batches as `betons.make_loader` (torch_threads is unused: DataLoader
    workers leave torch's thread count alone)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: missing .beton (run the write stage first)")
    records = BetonRecords(path, train=train, augment=augment, translate_pixels=translate_pixels, resolution=resolution)
    chosen = np.arange(len(records)) if indices is None else np.asarray(indices, dtype=np.int64)
    order = EpochOrder(chosen, shuffle=train, seed=seed, distributed=distributed)
    loader = DataLoader(
        records,
        batch_sampler=BatchSampler(order, batch_size, drop_last=train),
        num_workers=num_workers,
        collate_fn=_collate,
    )
    return TorchBetonLoader(loader, order)
