"""The DAG on a real SLURM cluster through submitit (slurm/setup-local-slurm.sh starts one; the
`slurm_cluster` fixture skips these tests without one, or fails them under .ci/run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import submitit
import torch
from conftest import mtrack, tiny_config

from pipeline.config import load_config
from pipeline.launchers.jobs import plan_jobs
from pipeline.launchers.slurm import submit_slurm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]
SHARDS = [
    "--set",
    "launch.mark_shards=2",
    "--set",
    "launch.audit_shards=2",
    "--set",
    "launch.slurm.poll_s=1",
    "--set",
    "launch.slurm.default.cpus_per_task=1",
    "--set",
    "launch.slurm.default.mem_gb=2",
]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_outputs(ours: Path, reference: Path) -> None:
    """Bit-identical data, weights and losses; only files recording time or the launch may differ."""
    for rel in (
        "plan/users.json",
        "plan/train_ids.npz",
        "write/train.beton",
        "write/arms.npz",
        "write/audit.beton",
        "write/test.beton",
    ):
        assert (ours / rel).read_bytes() == (reference / rel).read_bytes(), rel
    for arm in ("marked", "control"):
        w, ref_w = _weights(ours / f"train-{arm}" / "model.pt"), _weights(reference / f"train-{arm}" / "model.pt")
        assert all(torch.equal(w[k], ref_w[k]) for k in ref_w), f"train-{arm} weights differ"
        a, b = np.load(ours / f"audit-{arm}" / "losses.npz"), np.load(reference / f"audit-{arm}" / "losses.npz")
        order_a, order_b = np.lexsort((a["sample"], a["user"])), np.lexsort((b["sample"], b["user"]))
        assert np.array_equal(a["loss"][order_a], b["loss"][order_b]), f"audit-{arm} losses differ"


def test_dag_on_slurm_matches_local_and_reruns_a_failed_shard_alone(tiny_run: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    cfg = load_config(config)
    # Block shard 1 of the mark array: its output path is taken by a directory, so that task fails.
    blocker = Path(cfg.run_dir) / "mark" / "shard-0001-of-0002.npz"
    blocker.mkdir(parents=True)

    failed = mtrack("run", str(config), "--launcher", "slurm", *SHARDS)
    assert failed.returncode == 2, failed.stderr[-2000:]
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: mark shard 1 failed in SLURM job") and "log: " in error, error
    assert (Path(cfg.run_dir) / "mark" / "shard-0000-of-0002.json").exists()  # shard 0 finished and is kept

    shutil.rmtree(blocker)
    plan = mtrack("run", str(config), "--launcher", "slurm", "--dry-run", *SHARDS)
    assert plan.returncode == 0, plan.stderr
    mark_row = next(line for line in plan.stdout.splitlines() if line.startswith("mark "))
    assert "shards 1 of 2" in mark_row
    assert not any(line.startswith("plan ") for line in plan.stdout.splitlines())

    rerun = mtrack("run", str(config), "--launcher", "slurm", *SHARDS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    jobs = json.loads((Path(cfg.run_dir) / "launch" / "slurm-jobs.json").read_text())["jobs"]
    assert [(j["task"], j["shard"]) for j in jobs if j["task"] == "mark"] == [("mark", 1)]
    assert "plan" not in {j["task"] for j in jobs}

    _assert_same_outputs(Path(cfg.run_dir), Path(load_config(tiny_run).run_dir))  # local, unsharded
    metrics = json.loads((Path(cfg.results_dir) / "metrics.json").read_text())
    ref_metrics = json.loads((Path(load_config(tiny_run).results_dir) / "metrics.json").read_text())
    for block in ("set_based", "instance_based", "control_unmarked"):
        assert metrics[block] == ref_metrics[block], block


def test_preempted_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """SIGTERM then USR2, as SLURM preempts: submitit requeues, training continues from last.ckpt."""
    config = tiny_config(tmp_path)
    overrides = [
        "train.epochs=6",
        "train.checkpoint_every_n_steps=6",
        "train.arms=[marked]",
        "launch.slurm.default.cpus_per_task=1",
        "launch.slurm.default.mem_gb=2",
    ]
    for stage in ("plan", "mark", "write"):
        done = mtrack(stage, str(config), *(f"--set={o}" for o in overrides))
        assert done.returncode == 0, done.stderr[-2000:]
    cfg = load_config(config, overrides)
    record = submit_slurm(cfg, [j for j in plan_jobs(cfg) if j.task.stage == "train"])  # nothing left queued after
    (job,) = [submitit.SlurmJob(record.folder, j.job_id) for j in record.jobs]
    last = Path(cfg.run_dir) / "train-marked" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists():
        assert time.time() < deadline and not job.done(), "training never wrote a checkpoint"
        time.sleep(0.5)
    job._interrupt()  # submitit's simulated preemption: scancel --signal TERM, then USR2
    job.result()
    log = Path(job.paths.stderr).read_text()
    assert "train-marked: resumed from its last checkpoint at step" in log, log[-3000:]
    assert "(SLURM requeue 1)" in log and "train-marked: rank 0 of world size 1 (1 node(s) x 1 device(s)" in log
    status = mtrack("status", cfg.run_dir)
    assert status.returncode == 0, status.stderr
    assert "train-marked: resumed (1) from its checkpoint at step" in status.stdout, status.stdout
    metrics = json.loads((Path(cfg.run_dir) / "train-marked" / "metrics.json").read_text())
    assert metrics["global_step"] == 6 * (800 // 64)
    states = subprocess.run(
        ["sacct", "-n", "-X", "-D", "-j", job.job_id, "-o", "State"], capture_output=True, text=True
    ).stdout.split()
    assert "REQUEUED" in states or "PREEMPTED" in states, states
