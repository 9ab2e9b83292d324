"""Storage parity: a member's marked image is stored exactly like the clean image it replaces (same
size, same JPEG-or-raw decision, same quality), so nothing but the mark tells members apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ffcv.fields.rgb_image import IMAGE_MODES, resizer

from bench.common import write_jpeg_folder
from pipeline.config import RunConfig
from pipeline.core.survival import jpeg_roundtrip, summarise_survival, survival_correlations
from pipeline.data.images import fit_to_grid
from pipeline.data.ood import ood_pool
from pipeline.data.sources import StoredImages, load_source
from pipeline.data.torchdata import BetonRecords
from pipeline.stages.contract import Task
from pipeline.stages.dag import run_task
from pipeline.stages.mark import intended_marks, load_marked, user_images
from pipeline.stages.write import image_storage

SIZES = ((40, 30), (24, 36), (30, 30), (18, 22))  # (width, height): some beyond max_resolution 24, some within
MAX_RESOLUTION = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity") / "folder"
    write_jpeg_folder(root, "train", n_classes=2, per_class=16, sizes=SIZES, seed=0)
    write_jpeg_folder(root, "val", n_classes=2, per_class=2, sizes=SIZES, seed=1)
    return root


def _write(root: Path, run_dir: Path, mode: str, max_resolution: int | None, mark: dict) -> RunConfig:
    cfg = RunConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "results_dir": str(run_dir / "results"),
            "data": {
                "source": "imagefolder",
                "root": str(root),
                "image_size": 16,
                "n_train": 20,
                "clean_write_mode": mode,
                "jpeg_quality": 75,
                "max_resolution": max_resolution,
            },
            "plan": {"n_member_users": 2, "n_nonmember_users": 2, "samples_per_user": 3},
            "mark": {"examples_users": 1, **mark},
            "train": {"num_workers": 1, "resolution": 16 if max_resolution else None},
        }
    )
    for stage in ("plan", "mark", "write"):
        run_task(cfg, Task(stage))
    return cfg


def _records(cfg: RunConfig, name: str) -> BetonRecords:
    return BetonRecords(
        Path(cfg.run_dir) / "write" / name, train=False, augment="none", translate_pixels=0, resolution=None
    )


def _stored(records: BetonRecords, i: int) -> tuple[int, int, int, bytes]:
    mode, height, width, data = records.encoded(i)
    return mode, height, width, bytes(data)


def _members(cfg: RunConfig) -> tuple[list[dict], list[dict], dict[int, int]]:
    run = Path(cfg.run_dir)
    users = json.loads((run / "plan" / "users.json").read_text())["users"]
    train_ids = np.load(run / "plan" / "train_ids.npz")["train_ids"]
    position = {int(sid): i for i, sid in enumerate(train_ids)}
    return [u for u in users if u["role"] == "member"], users, position


def _arms(cfg: RunConfig) -> dict[str, np.ndarray]:
    """Record of train.beton each arm trains on, by training position."""
    return dict(np.load(Path(cfg.run_dir) / "write" / "arms.npz"))


@pytest.mark.parametrize("max_resolution", [None, MAX_RESOLUTION])
@pytest.mark.parametrize("mode", ["raw", "jpg", "proportion"])
def test_unmarked_members_are_stored_byte_for_byte_like_clean_images(
    folder: Path, tmp_path: Path, mode: str, max_resolution: int | None
) -> None:
    """With the mark switched off the marked set must be the clean set, record by record: any
    difference would be the storage telling members apart."""
    cfg = _write(folder, tmp_path / "run", mode, max_resolution, {"alpha": 1.0, "noise": "none"})
    members, users, position = _members(cfg)
    train, audit, arms = _records(cfg, "train.beton"), _records(cfg, "audit.beton"), _arms(cfg)
    sizes = set()
    for user in members:
        for sid in user["sample_ids"]:
            marked, clean = arms["marked"][position[sid]], arms["control"][position[sid]]
            assert marked != clean and train.ints["user"][marked] == user["user_id"] and train.ints["user"][clean] == -1
            record = _stored(train, marked)
            assert record == _stored(train, clean), f"member sample {sid} is stored unlike its clean image"
            sizes.add(record[1:3])
    # the audit scores the very records the model was trained on; a non-member's image gets the
    # storage its sample id would get in training
    storage, stored_images = image_storage(cfg), StoredImages(load_source(cfg.data).train_images, max_resolution)
    row = 0
    for user in users:
        for sid in user["sample_ids"]:
            mode_, height, width, data = _stored(audit, row)
            if user["role"] == "member":
                assert (mode_, height, width, data) == _stored(train, arms["marked"][position[sid]])
            assert mode_ == IMAGE_MODES["jpg" if storage.as_jpeg(np.array([sid]))[0] else "raw"]
            assert (height, width) == stored_images[sid].shape[:2]
            row += 1
    all_modes = set(train.image_meta["mode"].tolist())
    assert all_modes == {"raw": {1}, "jpg": {0}, "proportion": {0, 1}}[mode]
    assert (len(sizes) > 1) == (max_resolution is not None)  # images of varying size really went through


@pytest.mark.parametrize("max_resolution", [None, MAX_RESOLUTION])
@pytest.mark.parametrize("mode", ["raw", "jpg", "proportion"])
def test_marked_members_keep_the_size_and_encoding_of_their_clean_images(
    folder: Path, tmp_path: Path, mode: str, max_resolution: int | None
) -> None:
    cfg = _write(folder, tmp_path / "run", mode, max_resolution, {})
    members, users, position = _members(cfg)
    train, arms = _records(cfg, "train.beton"), _arms(cfg)
    member_positions = [position[sid] for user in members for sid in user["sample_ids"]]
    for i in member_positions:
        (mode_m, h_m, w_m, data_m), (mode_c, h_c, w_c, data_c) = (
            _stored(train, arms[arm][i]) for arm in ("marked", "control")
        )
        assert (mode_m, h_m, w_m) == (mode_c, h_c, w_c) and data_m != data_c
    # the report's stored-survival numbers describe this storage: each member's marked image as it
    # is kept, a JPEG round trip at data.jpeg_quality where its record is JPEG
    survival = json.loads((Path(cfg.run_dir) / "write" / "survival.json").read_text())
    jpeg = train.image_meta["mode"][arms["control"][member_positions]] == IMAGE_MODES["jpg"]
    assert survival["member_jpeg_share"] == pytest.approx(jpeg.mean())
    assert survival["n_images"] == len(member_positions)
    originals, patterns, seeds = intended_marks(
        cfg, load_source(cfg.data), members, ood_pool(cfg.mark, cfg.data.image_size)
    )
    marked = user_images(load_marked(Path(cfg.run_dir) / "mark" / "manifest.json", users), members)
    raw = [image for user in members for image in marked[user["user_id"]]]
    kept = [jpeg_roundtrip(image[None], 75)[0] if is_jpeg else image for image, is_jpeg in zip(raw, jpeg)]
    kept_by = {"stored": kept}
    expected = summarise_survival(
        [survival_correlations(originals, raw, cfg.mark, patterns, seeds, qualities=(), stored=kept_by)]
    )
    for version in ("raw", "stored"):
        assert survival["storage"][version] == pytest.approx(expected[version]), version


def test_fit_to_grid_shrinks_as_ffcv_writer_does() -> None:
    rng = np.random.default_rng(0)
    for h, w in ((500, 375), (375, 500), (333, 500), (501, 499), (24, 24), (25, 7), (40, 300)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for limit in (24, 256, 500):
            assert np.array_equal(fit_to_grid(image, limit), resizer(image, limit)), (h, w, limit)
            assert np.array_equal(fit_to_grid(fit_to_grid(image, limit), limit), fit_to_grid(image, limit))
