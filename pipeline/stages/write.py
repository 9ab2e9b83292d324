"""Stage `write`: the FFCV datasets every later stage reads.

- `train_marked.beton`: the training subset with each member user's images replaced by their
  marked versions (what a model trained on the owners' published data sees), each record with
  its user id (-1 for unmarked images), so training can report what happened to marked images;
- `train_clean.beton`: the same subset unmarked, for the control model;
- `test.beton`: the test split, for accuracy;
- `audit.beton`: every marked member and non-member image with its user id.

Marked images are stored raw on the grid they were marked on; clean ones as `data.clean_write_mode`
says (raw, JPEG, or a seeded proportion of JPEGs), and with `data.max_resolution` at their own
size (image folders: decoded from the file) shrunk to that longer side. File-backed images are
decoded by FFCV's writer workers one at a time; no split is ever held in memory.
"""
from __future__ import annotations

import numpy as np

from ..data.betons import CleanStorage, write_beton
from ..core.seeds import child_seed
from ..data.sources import ImageArray, full_resolution, load_source
from ..store import StageError, load_npz, read_json
from .contract import Context
from .mark import load_marked

BETONS = ("train_marked.beton", "train_clean.beton", "test.beton", "audit.beton")
STATS_IMAGES, STATS_CHUNK = 10_000, 256  # the pixel mean/std come from at most this many training images


class TrainingImages:
    """The training subset as the writer streams it: record i is source image `train_ids[i]`, or its
    marked copy for a member user's sample (`users[i]` is that user's id, else -1). Nothing is
    decoded before the writer asks for it."""

    def __init__(self, source: ImageArray, train_ids: np.ndarray, replaced: dict[int, np.ndarray],
                 users: np.ndarray | None = None) -> None:
        self.source, self.train_ids, self.replaced = source, train_ids, replaced
        self.users = np.full(len(train_ids), -1, np.int64) if users is None else users

    def __len__(self) -> int:
        return len(self.train_ids)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.replaced[i] if i in self.replaced else self.source[int(self.train_ids[i])]


def marked_training_set(
    source: ImageArray, train_ids: np.ndarray, marked: dict[str, np.ndarray], member_ids: set[int]
) -> TrainingImages:
    """The training images with every member user's samples swapped for their marked copies."""
    position = {int(sid): i for i, sid in enumerate(train_ids)}
    replaced, users = {}, np.full(len(train_ids), -1, np.int64)
    for row, (uid, sid) in enumerate(zip(marked["user_ids"], marked["sample_ids"])):
        if int(uid) in member_ids:
            if int(sid) not in position:
                raise StageError(f"write: member sample {int(sid)} of user {int(uid)} is not in the training subset")
            replaced[position[int(sid)]] = marked["images"][row]
            users[position[int(sid)]] = int(uid)
    return TrainingImages(source, train_ids, replaced, users)


def pixel_stats(images: ImageArray, ids: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] over the images at `ids` (all of them up to STATS_IMAGES,
    else that many evenly spaced), accumulated in chunks so no split is held in memory."""
    ids = ids[np.unique(np.linspace(0, len(ids) - 1, min(len(ids), STATS_IMAGES)).astype(np.int64))]
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for start in range(0, len(ids), STATS_CHUNK):
        pixels = images[ids[start : start + STATS_CHUNK]].reshape(-1, 3) / 255.0
        total, squares, count = total + pixels.sum(0), squares + (pixels**2).sum(0), count + len(pixels)
    mean = total / count
    return mean.round(6).tolist(), np.sqrt(np.maximum(squares / count - mean**2, 0)).round(6).tolist()


def run_write(ctx: Context) -> None:
    cfg, stage = ctx.config, ctx.stage
    users = read_json(ctx.input("users"))["users"]
    train_ids = load_npz(ctx.input("train_ids"))["train_ids"]
    marked = load_marked(ctx.input("marks").parent, users)
    data = load_source(cfg.data)
    d = cfg.data
    member_ids = {u["user_id"] for u in users if u["role"] == "member"}
    labels = data.train_labels[train_ids]
    clean = CleanStorage(d.clean_write_mode, d.max_resolution, d.jpeg_quality, d.compress_probability,
                         seed=child_seed(cfg.seed, 4))
    # clean images at their own size when they are shrunk to max_resolution anyway, else on the grid
    train_source = data.train_images if d.max_resolution is None else full_resolution(data.train_images)
    test_source = data.test_images if d.max_resolution is None else full_resolution(data.test_images)
    with_marks = marked_training_set(train_source, train_ids, marked, member_ids)
    is_marked = with_marks.users >= 0
    options = {"num_workers": cfg.write.num_workers, "clean": clean}
    write_beton(stage.path("train_marked.beton"), with_marks, labels, train_ids, with_marks.users, lossless=is_marked,
                **options)
    write_beton(stage.path("train_clean.beton"), TrainingImages(train_source, train_ids, {}), labels, train_ids,
                **options)
    n_test = len(data.test_labels)
    write_beton(stage.path("test.beton"), test_source, data.test_labels, np.arange(n_test), **options)
    write_beton(stage.path("audit.beton"), marked["images"], marked["labels"], marked["sample_ids"],
                marked["user_ids"], num_workers=cfg.write.num_workers)
    mean, std = pixel_stats(data.train_images, train_ids)
    stage.finish(list(BETONS), n_train=int(len(train_ids)), n_test=n_test, n_audit=int(len(marked["images"])),
                 num_classes=data.num_classes, mean=mean, std=std, clean_storage=clean.mode,
                 jpeg_train_records=int(clean.as_jpeg(train_ids).sum()))
