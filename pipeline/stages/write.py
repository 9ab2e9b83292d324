"""Stage `write`: the FFCV datasets every later stage reads.

- `train.beton`: the training subset once, unmarked, in training order (records 0..N-1, user -1),
  followed by one extra record per member image holding its marked copy (with its user id, so
  training can report what happened to marked images);
- `arms.npz`: which records each arm trains on, in training order: `control` the first N, `marked`
  the same with each member's sample swapped for its marked record. Both models thus see the same
  images in the same order (a loader's shuffle permutes positions, whatever the record ids), and
  the training set is stored once, not once per arm;
- `test.beton`: the test split, for accuracy;
- `audit.beton`: every marked member and non-member image with its user id.

Storage parity: every image, marked or clean, is stored the same way. Its pixels are those of
`StoredImages` (the grid, or with `data.max_resolution` its own size shrunk to that longer side),
on which the mark stage marked it; it is raw or JPEG (quality `data.jpeg_quality`) as
`data.clean_write_mode` decides for its sample id. A member's marked record thus has the size and
encoding of the clean record it replaces, and its audit record is byte for byte that training
record (a non-member's gets the decision its sample id would get), so nothing but the mark tells
members apart. `survival.json` says how much of the mark the members' training records keep under
this storage. Images are read one at a time as FFCV's writer workers ask for them (source files
decoded, marked images memory-mapped from the mark stage's shards); no split is held in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES

from ..config import RunConfig
from ..core.seeds import child_seed
from ..core.survival import summarise_survival, survival_correlations
from ..data.betons import ImageStorage, write_beton
from ..data.ood import ood_pool
from ..data.sources import ImageArray, ImageSplits, StoredImages, load_source
from ..data.torchdata import BetonRecords
from ..store import StageError, load_npz, read_json, save_npz, write_json
from .contract import Context
from .mark import SURVIVAL_USERS, intended_marks, load_marked, user_images

BETONS = ("train.beton", "test.beton", "audit.beton")
STATS_IMAGES, STATS_CHUNK = 10_000, 256  # the pixel mean/std come from at most this many training images


class TrainingRecords:
    """The records of `train.beton` as the writer streams them: record i < N is source image
    `train_ids[i]`, record N + j the marked image at row `marked_rows[j]` of the mark stage.
    Nothing is decoded before the writer asks for it."""

    def __init__(
        self, source: ImageArray | StoredImages, train_ids: np.ndarray, marked_images: Any, marked_rows: np.ndarray
    ) -> None:
        self.source, self.train_ids, self.marked_images, self.marked_rows = (
            source,
            train_ids,
            marked_images,
            marked_rows,
        )

    def __len__(self) -> int:
        return len(self.train_ids) + len(self.marked_rows)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.train_ids)
        return self.source[int(self.train_ids[i])] if i < n else self.marked_images[int(self.marked_rows[i - n])]


def member_records(
    train_ids: np.ndarray, marked: dict[str, Any], member_ids: set[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the marked images that belong to member users (manifest order) and the training
    positions of their samples."""
    position = {int(sid): i for i, sid in enumerate(train_ids)}
    rows = np.array([row for row, uid in enumerate(marked["user_ids"]) if int(uid) in member_ids], dtype=np.int64)
    for row in rows:
        if int(marked["sample_ids"][row]) not in position:
            raise StageError(
                f"write: member sample {int(marked['sample_ids'][row])} of user "
                f"{int(marked['user_ids'][row])} is not in the training subset"
            )
    return rows, np.array([position[int(marked["sample_ids"][row])] for row in rows], dtype=np.int64)


def arm_records(n_train: int, member_positions: np.ndarray) -> dict[str, np.ndarray]:
    """Record indices of `train.beton` per arm, in training order (see the module docstring)."""
    control = np.arange(n_train, dtype=np.int64)
    marked = control.copy()
    marked[member_positions] = n_train + np.arange(len(member_positions))
    return {"control": control, "marked": marked}


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


def stored_survival(
    cfg: RunConfig,
    data: ImageSplits,
    users: list[dict[str, Any]],
    marked: dict[str, Any],
    beton: Path,
    records_by_sample: dict[int, int],
) -> dict[str, Any]:
    """How much of the mark the member users' training records keep as this run stored them (read
    back from `beton`, JPEG decoded with OpenCV; `records_by_sample` gives each member sample's
    marked record), measured on the first SURVIVAL_USERS member users, next to the marked pixels
    before storage ("raw"); and the share of members' records that are JPEG."""
    members = [u for u in users if u["role"] == "member"]
    records = BetonRecords(beton, train=False, augment="none", translate_pixels=0, resolution=None)
    member_records = [records_by_sample[sid] for u in members for sid in u["sample_ids"]]
    measured = [u for u in members if "owner" not in u][:SURVIVAL_USERS]  # owners' marks are known to their keys
    share = float(np.mean(records.image_meta["mode"][member_records] == IMAGE_MODES["jpg"]))
    if not measured:
        return {
            "n_images": 0,
            "jpeg_quality": cfg.data.jpeg_quality,
            "member_jpeg_share": share,
            "storage": {"stored": {"full": None, "noise": None, "pattern": None}},
        }
    pool, parts = ood_pool(cfg.mark, cfg.data.image_size), []
    for user in measured:  # one user at a time: memory does not grow with their number
        originals, patterns, seeds = intended_marks(cfg, data, [user], pool)
        stored = [records.decoded(records_by_sample[sid]) for sid in user["sample_ids"]]
        raw = user_images(marked, [user])[user["user_id"]]  # in the order of its sample ids, as `intended_marks`
        parts.append(
            survival_correlations(originals, raw, cfg.mark, patterns, seeds, qualities=(), stored={"stored": stored})
        )
    correlations = summarise_survival(parts)
    return {
        "n_images": correlations.pop("n_images"),
        "jpeg_quality": cfg.data.jpeg_quality,
        "member_jpeg_share": share,
        "storage": correlations,
    }


def image_storage(cfg: RunConfig) -> ImageStorage:
    """How this run stores every image (the JPEG draw seeded from the run's seed)."""
    d = cfg.data
    return ImageStorage(d.clean_write_mode, d.jpeg_quality, d.compress_probability, seed=child_seed(cfg.seed, 4))


def run_write(ctx: Context) -> None:
    cfg, stage = ctx.config, ctx.stage
    users = read_json(ctx.input("users"))["users"]
    train_ids = load_npz(ctx.input("train_ids"))["train_ids"]
    marked = load_marked(ctx.input("marks"), users)
    data = load_source(cfg.data)
    d = cfg.data
    member_ids = {u["user_id"] for u in users if u["role"] == "member"}
    rows, positions = member_records(train_ids, marked, member_ids)
    n = len(train_ids)
    storage = image_storage(cfg)
    options = {"num_workers": cfg.write.num_workers, "storage": storage}
    write_beton(
        stage.path("train.beton"),
        TrainingRecords(StoredImages(data.train_images, d.max_resolution), train_ids, marked["images"], rows),
        np.concatenate([data.train_labels[train_ids], marked["labels"][rows]]),
        np.concatenate([train_ids, marked["sample_ids"][rows]]),
        np.concatenate([np.full(n, -1, np.int64), marked["user_ids"][rows]]),
        **options,
    )
    save_npz(stage.path("arms.npz"), **arm_records(n, positions))
    n_test = len(data.test_labels)
    write_beton(
        stage.path("test.beton"),
        StoredImages(data.test_images, d.max_resolution),
        data.test_labels,
        np.arange(n_test),
        **options,
    )
    write_beton(
        stage.path("audit.beton"),
        marked["images"],
        marked["labels"],
        marked["sample_ids"],
        marked["user_ids"],
        **options,
    )
    records_by_sample = {int(marked["sample_ids"][row]): n + j for j, row in enumerate(rows)}
    write_json(
        stage.path("survival.json"),
        stored_survival(cfg, data, users, marked, stage.path("train.beton"), records_by_sample),
    )
    mean, std = pixel_stats(data.train_images, train_ids)
    stage.finish(
        [*BETONS, "arms.npz", "survival.json"],
        n_train=n,
        n_marked_records=int(len(rows)),
        n_test=n_test,
        n_audit=int(len(marked["images"])),
        num_classes=data.num_classes,
        mean=mean,
        std=std,
        storage=storage.mode,
        jpeg_train_records=int(storage.as_jpeg(train_ids).sum()),
    )
