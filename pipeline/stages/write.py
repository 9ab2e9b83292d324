"""Stage `write`: the FFCV datasets every later stage reads.

- `train_marked.beton`: the training subset with each member user's images replaced by their
  marked versions (what a model trained on the owners' published data sees), each record with
  its user id (-1 for unmarked images), so training can report what happened to marked images;
- `train_clean.beton`: the same subset unmarked, for the control model;
- `test.beton`: the test split, for accuracy;
- `audit.beton`: every marked member and non-member image with its user id.

Storage parity: every image, marked or clean, is stored the same way. Its pixels are those of
`StoredImages` (the grid, or with `data.max_resolution` its own size shrunk to that longer side),
on which the mark stage marked it; it is raw or JPEG (quality `data.jpeg_quality`) as
`data.clean_write_mode` decides for its sample id. A member's marked image is thus stored with the
size and encoding of the clean image it replaces, and its audit record is byte for byte its
training record (a non-member's gets the decision its sample id would get), so nothing but the
mark tells members apart. `survival.json` says how much of the mark the members' training
records keep under this storage. File-backed images are decoded by FFCV's writer workers one at a
time; no split is ever held in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES

from ..config import RunConfig
from ..core.seeds import child_seed
from ..core.survival import mark_survival
from ..data.betons import ImageStorage, write_beton
from ..data.ood import ood_pool
from ..data.sources import ImageArray, ImageSplits, StoredImages, load_source
from ..data.torchdata import BetonRecords
from ..store import StageError, load_npz, read_json, write_json
from .contract import Context
from .mark import SURVIVAL_USERS, intended_marks, load_marked

BETONS = ("train_marked.beton", "train_clean.beton", "test.beton", "audit.beton")
STATS_IMAGES, STATS_CHUNK = 10_000, 256  # the pixel mean/std come from at most this many training images


class TrainingImages:
    """The training subset as the writer streams it: record i is source image `train_ids[i]`, or its
    marked copy for a member user's sample (`users[i]` is that user's id, else -1). Nothing is
    decoded before the writer asks for it."""

    def __init__(self, source: ImageArray | StoredImages, train_ids: np.ndarray, replaced: dict[int, np.ndarray],
                 users: np.ndarray | None = None) -> None:
        self.source, self.train_ids, self.replaced = source, train_ids, replaced
        self.users = np.full(len(train_ids), -1, np.int64) if users is None else users

    def __len__(self) -> int:
        return len(self.train_ids)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.replaced[i] if i in self.replaced else self.source[int(self.train_ids[i])]


def marked_training_set(
    source: ImageArray | StoredImages, train_ids: np.ndarray, marked: dict[str, np.ndarray], member_ids: set[int]
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


def stored_survival(cfg: RunConfig, data: ImageSplits, users: list[dict[str, Any]], marked: dict[str, np.ndarray],
                    beton: Path, train_ids: np.ndarray) -> dict[str, Any]:
    """How much of the mark the member users' training records keep as this run stored them (read
    back from `beton`, JPEG decoded with OpenCV), measured on the first SURVIVAL_USERS member users,
    next to the marked pixels before storage ("raw"); and the share of members' records that are
    JPEG."""
    members = [u for u in users if u["role"] == "member"]
    records = BetonRecords(beton, train=False, augment="none", translate_pixels=0, resolution=None)
    position = {int(sid): i for i, sid in enumerate(train_ids)}
    member_positions = [position[sid] for u in members for sid in u["sample_ids"]]
    measured = [u for u in members if "owner" not in u][:SURVIVAL_USERS]  # owners' marks are known to their keys
    share = float(np.mean(records.image_meta["mode"][member_positions] == IMAGE_MODES["jpg"]))
    if not measured:
        return {"n_images": 0, "jpeg_quality": cfg.data.jpeg_quality, "member_jpeg_share": share,
                "storage": {"stored": {"full": None, "noise": None, "pattern": None}}}
    originals, patterns, seeds = intended_marks(cfg, data, measured, ood_pool(cfg.mark, cfg.data.image_size))
    stored = [records.decoded(position[sid]) for u in measured for sid in u["sample_ids"]]
    rows = np.isin(marked["user_ids"], [u["user_id"] for u in measured])  # rows are in manifest order
    correlations = mark_survival(originals, marked["images"][rows], cfg.mark, patterns, seeds, qualities=(),
                                 stored={"stored": stored})
    return {"n_images": correlations.pop("n_images"), "jpeg_quality": cfg.data.jpeg_quality,
            "member_jpeg_share": share, "storage": correlations}


def image_storage(cfg: RunConfig) -> ImageStorage:
    """How this run stores every image (the JPEG draw seeded from the run's seed)."""
    d = cfg.data
    return ImageStorage(d.clean_write_mode, d.jpeg_quality, d.compress_probability, seed=child_seed(cfg.seed, 4))


def run_write(ctx: Context) -> None:
    cfg, stage = ctx.config, ctx.stage
    users = read_json(ctx.input("users"))["users"]
    train_ids = load_npz(ctx.input("train_ids"))["train_ids"]
    marked = load_marked(ctx.input("marks").parent, users)
    data = load_source(cfg.data)
    d = cfg.data
    member_ids = {u["user_id"] for u in users if u["role"] == "member"}
    labels = data.train_labels[train_ids]
    storage = image_storage(cfg)
    train_source = StoredImages(data.train_images, d.max_resolution)
    with_marks = marked_training_set(train_source, train_ids, marked, member_ids)
    options = {"num_workers": cfg.write.num_workers, "storage": storage}
    write_beton(stage.path("train_marked.beton"), with_marks, labels, train_ids, with_marks.users, **options)
    write_beton(stage.path("train_clean.beton"), TrainingImages(train_source, train_ids, {}), labels, train_ids,
                **options)
    n_test = len(data.test_labels)
    write_beton(stage.path("test.beton"), StoredImages(data.test_images, d.max_resolution), data.test_labels,
                np.arange(n_test), **options)
    write_beton(stage.path("audit.beton"), marked["images"], marked["labels"], marked["sample_ids"],
                marked["user_ids"], **options)
    write_json(stage.path("survival.json"),
               stored_survival(cfg, data, users, marked, stage.path("train_marked.beton"), train_ids))
    mean, std = pixel_stats(data.train_images, train_ids)
    stage.finish([*BETONS, "survival.json"], n_train=int(len(train_ids)), n_test=n_test,
                 n_audit=int(len(marked["images"])), num_classes=data.num_classes, mean=mean, std=std,
                 storage=storage.mode, jpeg_train_records=int(storage.as_jpeg(train_ids).sum()))
