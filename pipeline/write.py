"""Stage `write`: the FFCV datasets every later stage reads.

- `train_marked.beton`: the training subset with each member user's images replaced by their
  marked versions (what a model trained on the owners' published data sees);
- `train_clean.beton`: the same subset unmarked, for the control model;
- `test.beton`: the test split, for accuracy;
- `audit.beton`: every marked member and non-member image with its user id.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .betons import write_beton
from .config import RunConfig
from .sources import ImageSplits
from .store import Stage, StageError

BETONS = ("train_marked.beton", "train_clean.beton", "test.beton", "audit.beton")


def marked_training_set(
    data: ImageSplits, train_ids: np.ndarray, marked: dict[str, np.ndarray], member_ids: set[int]
) -> np.ndarray:
    """The training images with every member user's samples swapped for their marked copies."""
    images = data.train_images[train_ids].copy()
    position = {int(sid): i for i, sid in enumerate(train_ids)}
    for row, (uid, sid) in enumerate(zip(marked["user_ids"], marked["sample_ids"])):
        if int(uid) in member_ids:
            if int(sid) not in position:
                raise StageError(f"write: member sample {int(sid)} of user {int(uid)} is not in the training subset")
            images[position[int(sid)]] = marked["images"][row]
    return images


def run_write(
    cfg: RunConfig, stage: Stage, data: ImageSplits, users: list[dict[str, Any]], train_ids: np.ndarray,
    marked: dict[str, np.ndarray],
) -> None:
    member_ids = {u["user_id"] for u in users if u["role"] == "member"}
    labels = data.train_labels[train_ids]
    workers = cfg.train.num_workers
    write_beton(stage.path("train_marked.beton"), marked_training_set(data, train_ids, marked, member_ids),
                labels, train_ids, num_workers=workers)
    write_beton(stage.path("train_clean.beton"), data.train_images[train_ids], labels, train_ids, num_workers=workers)
    write_beton(stage.path("test.beton"), data.test_images, data.test_labels, np.arange(len(data.test_labels)),
                num_workers=workers)
    write_beton(stage.path("audit.beton"), marked["images"], marked["labels"], marked["sample_ids"],
                marked["user_ids"], num_workers=workers)
    pixels = data.train_images[train_ids].reshape(-1, 3) / 255.0
    stage.finish(list(BETONS), n_train=int(len(train_ids)), n_test=int(len(data.test_labels)),
                 n_audit=int(len(marked["images"])), num_classes=data.num_classes,
                 mean=pixels.mean(axis=0).round(6).tolist(), std=pixels.std(axis=0).round(6).tolist())
