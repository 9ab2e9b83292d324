"""Every stage killed with SIGKILL at a seeded random moment, then run again, ends with outputs
bit-identical to an uninterrupted run; outputs found right after the kill are already whole.

Each stage runs as `python -m pipeline.cli STAGE configs/tiny.yaml --set ...` in its own process
group, killed as a batch scheduler kills a job. Training is killed after a mid-run checkpoint and
must resume from it (same step count, same weights: the FFCV order is replayed from the epoch and
the batch the checkpoint recorded)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.store import file_sha256, read_json

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ("plan", "mark", "write", "train", "audit", "report")
ARM = {"train": "marked", "audit": "marked"}
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 2, 12, 4  # tiny: 800 images, batch 64, drop_last
OVERRIDES = [
    "train.arms=[marked]",
    f"train.epochs={EPOCHS}",
    "train.augment=none",
    f"train.checkpoint_every_n_steps={CHECKPOINT_EVERY}",
]


def _command(stage: str, root: Path) -> list[str]:
    sets = [f"run_dir={root / 'run'}", f"results_dir={root / 'results'}", *OVERRIDES]
    cmd = [sys.executable, "-m", "pipeline.cli", stage, str(REPO / "configs" / "tiny.yaml")]
    cmd += [arg for s in sets for arg in ("--set", s)]
    return cmd + (["--arm", ARM[stage]] if stage in ARM else [])


def _stage_dir(root: Path, stage: str) -> Path:
    return root / "run" / (f"{stage}-{ARM[stage]}" if stage in ARM else stage)


def _start(stage: str, root: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        _command(stage, root), cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(stage: str, root: Path) -> float:
    log = root / f"{stage}.log"
    started = time.perf_counter()
    proc = _start(stage, root, log)
    assert proc.wait() == 0, log.read_text()[-3000:]
    return time.perf_counter() - started


def _outputs(root: Path, stage: str) -> dict[str, str]:
    """SHA-256 of every output the stage's manifest lists (the manifest itself also holds timings)."""
    return read_json(_stage_dir(root, stage) / "manifest.json")["outputs"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """An uninterrupted run, one process per stage, with each stage's wall time."""
    root = tmp_path_factory.mktemp("reference")
    return root, {stage: _finish(stage, root) for stage in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_reruns_to_identical_outputs(stage: str, reference, tmp_path: Path) -> None:
    ref_root, seconds = reference
    expected = _outputs(ref_root, stage)
    for upstream in STAGES[: STAGES.index(stage)]:
        shutil.copytree(_stage_dir(ref_root, upstream), _stage_dir(tmp_path, upstream))
    rng = random.Random(f"kill {stage}")
    proc = _start(stage, tmp_path, tmp_path / f"{stage}-killed.log")
    if stage == "train":  # kill soon after a checkpoint taken mid-run, so the re-run has to resume
        checkpoints = _stage_dir(tmp_path, stage) / "checkpoints"
        while proc.poll() is None and not (checkpoints / "last.ckpt").exists():
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
    else:
        time.sleep(rng.uniform(0.2, 0.9) * seconds[stage])
    was_running = proc.poll() is None
    if was_running:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = _stage_dir(tmp_path, stage)
    for rel, digest in expected.items():  # whatever output exists after the kill is already whole
        if (out / rel).exists():
            assert file_sha256(out / rel) == digest, f"{rel} exists but is not the finished file"

    if stage == "train":
        last = checkpoints / "last.ckpt"
        resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        assert was_running and 0 < resumed_from < EPOCHS * STEPS_PER_EPOCH, "the kill missed the mid-run window"
    _finish(stage, tmp_path)
    assert _outputs(tmp_path, stage) == expected
    assert not list(out.glob(".*.tmp")), "temporary files of the killed run were left behind"
    if stage == "train":
        resumed_log = (tmp_path / "train.log").read_text()
        assert f"train-marked: resumed from its last checkpoint at step {resumed_from}," in resumed_log
        assert "exists and is not empty" not in resumed_log  # Lightning's warning: our own line says it
        assert read_json(out / "metrics.json")["global_step"] == EPOCHS * STEPS_PER_EPOCH


def test_training_killed_after_validation_keeps_that_epochs_best_record(reference, tmp_path: Path) -> None:
    """Killed right after epoch 0's validation wrote its best checkpoint (before or after that
    epoch's closing `last.ckpt`), the resumed run still names epoch 0 as best, as the uninterrupted
    run does: epoch 1 only ties it on the tiny task and a tie does not replace the best."""
    ref_root, _ = reference
    for upstream in STAGES[: STAGES.index("train")]:
        shutil.copytree(_stage_dir(ref_root, upstream), _stage_dir(tmp_path, upstream))
    proc = _start("train", tmp_path, tmp_path / "train-killed.log")
    checkpoints = _stage_dir(tmp_path, "train") / "checkpoints"
    while proc.poll() is None and not list(checkpoints.glob("best-0-*.ckpt")):
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _finish("train", tmp_path)
    expected = read_json(_stage_dir(ref_root, "train") / "metrics.json")
    assert expected["best_val_checkpoint"].startswith("best-0-")
    assert read_json(_stage_dir(tmp_path, "train") / "metrics.json") == expected
    assert _outputs(tmp_path, "train") == _outputs(ref_root, "train")
