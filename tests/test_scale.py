"""Growth with the data: the write stage's memory does not grow with the marked images, a rehearsal's
sizes follow its folder, and the ImageNet-shaped generator is deterministic and ImageNet-like."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import mtrack
from PIL import Image

from bench.imagenet_like import generate, photo_like
from pipeline.config import load_config
from pipeline.rehearsal import HELD_OUT_SLACK, rehearsal_sizes
from pipeline.stages.contract import Task
from pipeline.stages.dag import run_task
from pipeline.store import read_json

K = 25


def _marked_run(folder: Path, marked_images: int) -> Path:
    """A synthetic run (64 px, 10,000 images) whose mark stage marks `marked_images` images."""
    users = marked_images // K
    folder.mkdir(parents=True)
    config = folder / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(folder / "run"),
                "results_dir": str(folder / "results"),
                "data": {"source": "synthetic", "image_size": 64, "n_train": 1000, "synthetic_per_class": 1000},
                "plan": {"n_member_users": 4, "n_nonmember_users": users - 4, "samples_per_user": K},
                "mark": {"examples_users": 2},
                "write": {"num_workers": 1},
            }
        )
    )
    cfg = load_config(config)
    for stage in ("plan", "mark"):
        run_task(cfg, Task(stage))
    return config


@pytest.mark.slow
def test_the_write_stage_memory_does_not_grow_with_the_marked_images(tmp_path: Path) -> None:
    """2,000 and 8,000 marked images of 64 x 64 px: holding them would cost 74 MB more in the larger
    run (12 KB each); streaming them from the mark stage's shards costs nothing that grows."""
    peaks = {}
    for n in (2000, 8000):
        config = _marked_run(tmp_path / str(n), n)
        result = mtrack("write", str(config))  # a fresh process: its peak is the stage's own
        assert result.returncode == 0, result.stderr[-2000:]
        written = read_json(tmp_path / str(n) / "run" / "write" / "manifest.json")
        assert written["n_audit"] == n
        peaks[n] = written["usage"]["peak_anon_mb"]
    assert peaks[2000] > 100  # the measurement sees the process (torch, FFCV and the 123 MB source)
    assert peaks[8000] - peaks[2000] < 25, peaks


def test_rehearsal_sizes_follow_the_folder() -> None:
    recipe = load_config(Path(__file__).parents[1] / "configs" / "imagenet-rn50.yaml", ["data.root=/nowhere"])
    imagenet = rehearsal_sizes(1_281_167, recipe)  # at ImageNet's own size: the target scale
    assert imagenet["plan.n_nonmember_users"] == 5125 and imagenet["plan.samples_per_user"] == K
    held_out = 1_281_167 - imagenet["data.n_train"]
    assert held_out == int(np.ceil(HELD_OUT_SLACK * 5125 * K)) and 150_000 <= held_out <= 160_000
    assert imagenet["plan.n_member_users"] == round(500 * imagenet["data.n_train"] / recipe.data.n_train)
    small = rehearsal_sizes(5_200, recipe)
    assert small["plan.n_nonmember_users"] == 21 and small["plan.n_member_users"] == 2  # at least two members
    assert small["data.n_train"] == 5_200 - int(np.ceil(HELD_OUT_SLACK * 21 * K))
    for n in (5_200, 20_800, 52_000):  # the audit set stays a tenth of the data
        sizes = rehearsal_sizes(n, recipe)
        assert sizes["plan.n_nonmember_users"] * K == pytest.approx(0.1 * n, rel=0.05)


def test_imagenet_like_images_are_deterministic_and_photo_sized(tmp_path: Path) -> None:
    assert np.array_equal(photo_like(0, 0, 3, 7), photo_like(0, 0, 3, 7))
    assert not np.array_equal(photo_like(0, 0, 3, 7), photo_like(1, 0, 3, 7))
    summary = generate(tmp_path / "data", images=24, per_class=12, val_per_class=2, workers=1)
    files = sorted((tmp_path / "data" / "train").rglob("*.JPEG"))
    assert (
        len(files) == 24
        and summary["spec"]["classes"] == 2
        and len(list((tmp_path / "data" / "val").rglob("*.JPEG"))) == 4
    )
    sides = [sorted(Image.open(f).size) for f in files]
    assert all(120 <= short <= long <= 500 for short, long in sides)
    assert 40 < summary["mean_kb"] < 200  # photographs at quality 90, not flat colour or white noise
    again = generate(tmp_path / "copy", images=24, per_class=12, val_per_class=2, workers=2)
    assert [f.read_bytes() for f in files] == [
        f.read_bytes() for f in sorted((tmp_path / "copy" / "train").rglob("*.JPEG"))
    ]
    assert json.loads((tmp_path / "copy" / "dataset.json").read_text())["spec"] == again["spec"]


def test_a_folder_too_small_for_a_rehearsal_is_refused_in_one_line(tmp_path: Path) -> None:
    from bench.common import write_jpeg_folder

    write_jpeg_folder(tmp_path / "tiny", "train", n_classes=2, per_class=20, sizes=((20, 16),))
    write_jpeg_folder(tmp_path / "tiny", "val", n_classes=2, per_class=2, sizes=((20, 16),))
    result = mtrack(
        "run",
        "configs/imagenet-rn50.yaml",
        "--rehearse",
        "--dry-run",
        "--set",
        f"data.root={tmp_path / 'tiny'}",
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: data.root: 40 training images are too few for a rehearsal (K = 25: at least 220)"
    ]
