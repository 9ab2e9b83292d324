"""FFCV `.beton` files: writing them atomically and building loaders over them.

Every image is stored as `ImageStorage` decides for its sample id, raw or JPEG, whether it carries
a mark or not: a marked image is stored exactly like the clean image it replaces (the caller hands
both over on the same pixel grid, see `data.sources.StoredImages`), so storage cannot tell members
apart. Every record carries `sample` (its id in the source split) and `user` (-1 for images that
belong to no user), so any loader's output can be traced back to the manifest. Augmentation runs
inside FFCV's per-sample operations (each image its own flip and shift, or its own random-resized
crop).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

# FFCV sets torch's intra-op threads to its own worker count, at import and whenever a loader is
# built or iterated (ffcv.pipeline.compiler), which silently runs the model on one core. Remember
# torch's setting from before that and put it back; see BetonLoader.
TORCH_THREADS = torch.get_num_threads()

from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import (
    CenterCropRGBImageDecoder,
    IntDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter

from ..store import StageError, atomic_path

log = logging.getLogger("pipeline")
FIELDS = ("image", "label", "sample", "user")
EVAL_CROP_RATIO = 224 / 256  # centre crop for evaluation at a resolution, as FFCV's ImageNet example


@dataclass(frozen=True)
class ImageStorage:
    """How a run stores its images: all raw, all JPEG, or a seeded share as JPEG. FFCV's own
    `proportion` mode draws JPEG-or-raw per image from numpy's global generator in each writer
    process, so two writes differ; here the draw is a function of (seed, sample id), so an image is
    JPEG in every file of a run (marked or clean, training or audit) or in none."""

    mode: Literal["raw", "jpg", "proportion"] = "raw"
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    seed: int = 0

    def as_jpeg(self, samples: np.ndarray) -> np.ndarray:
        """Per sample id: True where the image is stored as JPEG."""
        if self.mode != "proportion" or len(samples) == 0:
            return np.full(len(samples), self.mode == "jpg")
        draws = np.random.default_rng(self.seed).random(int(np.max(samples)) + 1)  # draw k belongs to sample k
        return draws[np.asarray(samples)] < self.compress_probability


class _EncodeByRecord:
    """Encodes an (image, as_jpeg) value with the storage's JPEG quality or raw, at the size given."""

    def __init__(self, storage: ImageStorage) -> None:
        self.encoders = {
            False: RGBImageField(write_mode="raw"),
            True: RGBImageField(write_mode="jpg", jpeg_quality=storage.jpeg_quality),
        }

    def __call__(self, destination: Any, value: tuple[np.ndarray, bool], malloc: Any) -> None:
        image, as_jpeg = value
        self.encoders[as_jpeg].encode(destination, image, malloc)


def _image_field(storage: ImageStorage) -> RGBImageField:
    """A plain `RGBImageField` (FFCV writes the field type into the header by exact class, so a
    subclass would make the file unreadable to stock readers) whose encoding is chosen per record."""
    field = RGBImageField(write_mode="raw")
    field.encode = _EncodeByRecord(storage)
    return field


class _Records:
    """The indexable view FFCV's writer wants: one ((image, as_jpeg), label, sample, user) tuple per
    index. Images are fetched (for file-backed sources: decoded) only when the writer asks."""

    def __init__(
        self, images: Any, labels: np.ndarray, samples: np.ndarray, users: np.ndarray, as_jpeg: np.ndarray
    ) -> None:
        self.images, self.labels, self.samples, self.users, self.as_jpeg = images, labels, samples, users, as_jpeg

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[tuple[np.ndarray, bool], int, int, int]:
        return ((self.images[i], bool(self.as_jpeg[i])), int(self.labels[i]), int(self.samples[i]), int(self.users[i]))


def write_beton(
    path: str | Path,
    images: Any,
    labels: np.ndarray,
    samples: np.ndarray,
    users: np.ndarray | None = None,
    num_workers: int = 1,
    storage: ImageStorage = ImageStorage(),
) -> None:
    """Write images (anything indexable by record giving (H, W, 3) uint8, stored at that size) with
    their ids, each raw or JPEG as `storage` decides for its sample id; the file appears only when
    complete."""
    n = len(labels)
    users = np.full(n, -1, dtype=np.int64) if users is None else users
    if not (len(images) == n == len(samples) == len(users)):
        raise StageError(f"{path}: images, labels, samples and users differ in length")
    fields = {"image": _image_field(storage), "label": IntField(), "sample": IntField(), "user": IntField()}
    log.info("writing %s: %d images", Path(path).name, n)  # FFCV's own bar follows on a terminal
    with atomic_path(path) as tmp:
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(
            _Records(images, labels, samples, users, storage.as_jpeg(samples))
        )


class EpochPosition:
    """Which epoch a loader serves and how far into it it got: the caller sets `epoch` (so a resumed
    run replays the same order and a probing `iter()` changes nothing), and the position is saved
    in Lightning checkpoints (`state_dict`), so a run resumed mid-epoch goes on with the batches the
    epoch had not reached instead of starting it over."""

    epoch: int = 0
    batches_done: int = 0  # batches of the current epoch handed out so far
    skip_batches: int = 0  # batches to pass over at the next iter(), set when resuming

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "batches_per_epoch": len(self)}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Saved after an epoch's last batch (judged by that run's epoch length, which differs when
        resumed on another number of processes), the next epoch starts afresh."""
        self.epoch, self.skip_batches = state["epoch"], state["batches_done"]
        if self.skip_batches >= state.get("batches_per_epoch", len(self)):  # type: ignore[arg-type]
            self.epoch, self.skip_batches = self.epoch + 1, 0

    def _from_position(self, batches: Iterator[tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
        skip, self.skip_batches, self.batches_done = self.skip_batches, 0, 0
        for batch in batches:
            self.batches_done += 1
            if self.batches_done > skip:
                yield batch


class BetonLoader(EpochPosition):
    """An FFCV loader as training and audit code should see it: with its `EpochPosition`; torch
    keeps its own thread count (FFCV resets it on every `iter()`); the FFCV iterator starts lazily
    on the first batch, so Lightning's probe starts no prefetch.

    FFCV fills a small ring of preallocated buffers and reuses them for later batches, so a tensor
    it yields changes under whoever keeps it. The ids (label, sample, user) are copied here, a few
    bytes per image, since code collects them across batches; the images stay FFCV's buffers, valid
    until the next batch or two: compute from them at once or copy what is kept."""

    def __init__(self, loader: Loader, torch_threads: int, decoder: SimpleRGBImageDecoder | None = None) -> None:
        self.loader = loader
        self.torch_threads = torch_threads
        self.decoder = decoder
        torch.set_num_threads(torch_threads)

    def set_resolution(self, resolution: int) -> None:
        """Crop size of the next epochs (progressive resizing): FFCV rebuilds its pipeline for it."""
        size = (resolution, resolution)
        if self.decoder is None or not hasattr(self.decoder, "output_size"):
            raise StageError("progressive resizing needs train.resolution (cropping decoders)")
        if tuple(self.decoder.output_size) != size:
            self.decoder.output_size = size
            self.loader.recompile = True  # FFCV compiles its pipeline, buffers included, for one shape

    @property
    def num_samples(self) -> int:
        return len(self.loader.indices)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.loader.next_epoch = self.epoch
        iterator = iter(self.loader)
        torch.set_num_threads(self.torch_threads)
        for images, *ids in self._from_position(iterator):
            yield images, *(field.clone() for field in ids)


def image_decoder(train: bool, resolution: int | None) -> SimpleRGBImageDecoder:
    """Stored pixels as they are (all images one size), or at `resolution`: a random-resized crop
    for training, a centre crop of 224/256 of the shorter side for evaluation."""
    if resolution is None:
        return SimpleRGBImageDecoder()
    if train:
        return RandomResizedCropRGBImageDecoder((resolution, resolution))
    return CenterCropRGBImageDecoder((resolution, resolution), ratio=EVAL_CROP_RATIO)


def make_loader(
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
) -> BetonLoader:
    """An FFCV loader yielding (uint8 NCHW images, labels, sample ids, user ids) on the CPU.

    Training loaders shuffle (seeded) and augment per sample; evaluation loaders keep file order
    and never drop the last partial batch, so every sample is scored exactly once. With
    `distributed`, FFCV orders through torch's DistributedSampler (rank and world size from
    torch.distributed): each rank gets every world_size-th index of the (shuffled) order, padded
    by repetition to equal length."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: missing .beton (run the write stage first)")
    decoder = image_decoder(train, resolution)
    image_ops: list = [decoder]
    if train and augment in ("flip", "flip_translate"):
        image_ops.append(RandomHorizontalFlip())
    if train and augment == "flip_translate" and translate_pixels > 0:
        image_ops.append(RandomTranslate(padding=translate_pixels))
    image_ops += [ToTensor(), ToTorchImage(channels_last=True)]  # NCHW shape, NHWC memory: no copy
    int_ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=num_workers,
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        seed=seed,
        distributed=distributed,
        drop_last=train,
        indices=indices,
        pipelines={"image": image_ops, "label": list(int_ops), "sample": list(int_ops), "user": list(int_ops)},
    )
    return BetonLoader(loader, torch_threads or TORCH_THREADS, decoder)


def read_all(path: str | Path, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Every record of a beton in file order (for checks and small audits)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
    for batch in make_loader(path, batch_size, 1, train=False):
        for key, value in zip(FIELDS, batch):
            parts[key].append(value.clone())
    return {k: torch.cat(v) for k, v in parts.items()}
