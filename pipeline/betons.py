"""FFCV `.beton` files: writing them atomically and building loaders over them.

Images are stored raw (lossless) on the grid they were marked on, so the model sees exactly the
marked pixels. Every record carries `sample` (its id in the source split) and `user` (-1 for
images that belong to no user), so any loader's output can be traced back to the manifest.
Augmentation runs inside FFCV's per-sample operations (each image its own flip and shift).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

# FFCV sets torch's intra-op threads to its own worker count, at import and whenever a loader is
# built or iterated (ffcv.pipeline.compiler), which silently runs the model on one core. Remember
# torch's setting from before that and put it back; see BetonLoader.
TORCH_THREADS = torch.get_num_threads()

from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter

from .store import StageError, atomic_path

FIELDS = ("image", "label", "sample", "user")


class _ArrayDataset:
    """The indexable view FFCV's writer wants: one (image, label, sample, user) tuple per index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, samples: np.ndarray, users: np.ndarray) -> None:
        self.images, self.labels, self.samples, self.users = images, labels, samples, users

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int, int]:
        return self.images[i], int(self.labels[i]), int(self.samples[i]), int(self.users[i])


def write_beton(
    path: str | Path, images: np.ndarray, labels: np.ndarray, samples: np.ndarray, users: np.ndarray | None = None,
    num_workers: int = 1,
) -> None:
    """Write (N, H, W, 3) uint8 images losslessly with their ids; the file appears only when complete."""
    if users is None:
        users = np.full(len(images), -1, dtype=np.int64)
    if not (len(images) == len(labels) == len(samples) == len(users)):
        raise StageError(f"{path}: images, labels, samples and users differ in length")
    fields = {
        "image": RGBImageField(write_mode="raw"),
        "label": IntField(),
        "sample": IntField(),
        "user": IntField(),
    }
    with atomic_path(path) as tmp:
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(
            _ArrayDataset(images, labels, samples, users)
        )


class BetonLoader:
    """An FFCV loader as training and audit code should see it.

    - torch keeps its own thread count (FFCV resets it on every `iter()`);
    - the shuffle epoch is set by the caller (`epoch`), not by how often `iter()` was called, so a
      resumed run replays the same order and Lightning's probing `iter()` changes nothing;
    - the FFCV iterator starts lazily on the first batch, so a probe starts no prefetch;
    - its position in the epoch is saved in Lightning checkpoints (`state_dict`), so a run resumed
      mid-epoch goes on with the batches that epoch had not reached instead of starting it over."""

    def __init__(self, loader: Loader, torch_threads: int) -> None:
        self.loader = loader
        self.torch_threads = torch_threads
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch handed out so far
        self.skip_batches = 0  # batches to pass over at the next iter(), set when resuming
        torch.set_num_threads(torch_threads)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.skip_batches = state["epoch"], state["batches_done"]
        if self.skip_batches >= len(self):  # saved after the epoch's last batch: the next one starts afresh
            self.epoch, self.skip_batches = self.epoch + 1, 0

    @property
    def num_samples(self) -> int:
        return len(self.loader.indices)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.loader.next_epoch = self.epoch
        iterator = iter(self.loader)
        torch.set_num_threads(self.torch_threads)
        skip, self.skip_batches, self.batches_done = self.skip_batches, 0, 0
        for batch in iterator:
            self.batches_done += 1
            if self.batches_done > skip:
                yield batch


def make_loader(
    path: str | Path, batch_size: int, num_workers: int, *, train: bool, augment: str = "none",
    translate_pixels: int = 0, seed: int = 0, distributed: bool = False, indices: Sequence[int] | None = None,
    torch_threads: int | None = None,
) -> BetonLoader:
    """An FFCV loader yielding (uint8 NCHW images, labels, sample ids, user ids) on the CPU.

    Training loaders shuffle (seeded) and augment per sample; evaluation loaders keep file order
    and never drop the last partial batch, so every sample is scored exactly once."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: missing .beton (run the write stage first)")
    image_ops: list = [SimpleRGBImageDecoder()]
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
    return BetonLoader(loader, torch_threads or TORCH_THREADS)


def read_all(path: str | Path, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Every record of a beton in file order (for checks and small audits)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
    for batch in make_loader(path, batch_size, 1, train=False):
        for key, value in zip(FIELDS, batch):
            parts[key].append(value.clone())
    return {k: torch.cat(v) for k, v in parts.items()}
