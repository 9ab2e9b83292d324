"""The SLURM path as a user meets it, on the real local cluster (slurm/setup-local-slurm.sh): an
impossible request refused before anything is submitted, a refused sbatch leaving nothing queued, a
job stuck pending ending the run, and `make rehearsal` (the ImageNet recipe, rehearsed) followed state by state
to its report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, mtrack, tiny_config

from bench.common import write_jpeg_folder
from pipeline.config import load_config
from pipeline.launchers.follow import JobRecord, cancel, query_states
from pipeline.launchers.jobs import plan_jobs
from pipeline.launchers.slurm import submit_slurm
from pipeline.store import StageError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]
FAST = ["launch.slurm.default.cpus_per_task=1", "launch.slurm.default.mem_gb=1", "launch.slurm.poll_s=1"]


@pytest.fixture(autouse=True)
def cancel_leftovers(tmp_path: Path) -> Iterator[None]:
    """A failing test must not leave jobs behind for the next one: cancel whatever its runs recorded."""
    yield
    for path in tmp_path.rglob("slurm-jobs.json"):
        cancel([j.job_id for j in JobRecord.load(path).jobs])


def _node_cpus() -> int:
    return max(
        int(c.strip("+"))
        for c in subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout.split()
    )


def _queued(job_ids: list[str], within_s: float = 30) -> list[str]:
    """Those of `job_ids` still pending or running after `within_s` (a cancelled job that was running
    takes SLURM's KillWait to end)."""
    deadline = time.time() + within_s
    while (live := [j for j, state in query_states(job_ids).items() if state.live]) and time.time() < deadline:
        time.sleep(0.5)
    return live


def _our_queued_jobs() -> list[str]:
    """Every job of this pipeline SLURM still holds as pending or running."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if " mtrack-" in line]


def test_an_impossible_request_is_refused_before_anything_is_submitted(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    too_many = _node_cpus() + 1
    refused = mtrack(
        "run", str(config), "--launcher", "slurm", "--set", f"launch.slurm.default.cpus_per_task={too_many}"
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: launch.slurm.default.cpus_per_task: plan asks for {too_many} CPUs per node; partition debug's largest "
        f"node has {too_many - 1} CPUs; nothing submitted (--dry-run shows each job against the partition)"
    ]
    assert not (tmp_path / "run").exists() and not _our_queued_jobs()

    shown = mtrack(
        "run", str(config), "--launcher", "slurm", "--dry-run", "--set", "launch.slurm.stages.train.gpus_per_node=1"
    )
    assert shown.returncode == 0, shown.stderr
    assert (
        "  train-marked   launch.slurm.stages.train.gpus_per_node: 1 GPU per node; no node of partition debug has "
        "a GPU" in shown.stdout
    )
    assert "  plan           fits" in shown.stdout

    unknown = mtrack("run", str(config), "--launcher", "slurm", "--set", "launch.slurm.partition=gpu-typo")
    assert (
        unknown.returncode == 2
        and unknown.stderr.strip()
        == "error: launch.slurm.partition: partition 'gpu-typo' does not exist on this cluster (partitions: debug)"
    )
    assert not _our_queued_jobs()


def test_a_refused_sbatch_cancels_the_jobs_already_submitted(tmp_path: Path) -> None:
    """sbatch can refuse a job the pre-flight passed (a per-user submit limit, an account it does not
    know); here the pre-flight is bypassed and the training job asks for a GPU the cluster lacks."""
    cfg = load_config(tiny_config(tmp_path), [*FAST, "launch.slurm.stages.train.gpus_per_node=1"])
    with pytest.raises(StageError) as refused:
        submit_slurm(cfg, plan_jobs(cfg))
    message = str(refused.value)
    assert message.startswith(
        "train-marked: sbatch refused the job: Invalid generic resource (gres) specification; "
        "cancelled the 3 job(s) already submitted for this run ("
    )
    record = JobRecord.load(JobRecord.path_for(cfg.run_dir))  # saved as the jobs went in
    assert [j.task for j in record.jobs] == ["plan", "mark", "write"]
    assert not _queued([j.job_id for j in record.jobs])


def test_a_job_stuck_pending_is_shown_by_status_and_ends_the_run(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    stuck = [*FAST, f"launch.slurm.default.cpus_per_task={_node_cpus() + 1}"]
    cfg = load_config(config, stuck)
    record = submit_slurm(cfg, plan_jobs(cfg))  # past the pre-flight, as if the partition shrank meanwhile
    plan_job = record.jobs[0].job_id
    deadline = time.time() + 60
    while query_states([plan_job])[plan_job].reason != "PartitionConfig":
        assert time.time() < deadline, "SLURM never gave the plan job a pending reason"
        time.sleep(0.5)

    status = mtrack("status", cfg.run_dir)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert f"plan (job {plan_job}): pending (PartitionConfig)" in lines
    assert lines[-1] == (
        f"the run cannot finish: plan (job {plan_job}) can never start: SLURM keeps it pending with "
        "reason PartitionConfig (its request exceeds what the partition allows); fix the request and re-run"
    )
    again = mtrack("run", str(config), "--launcher", "slurm", "--no-wait", *(f"--set={o}" for o in FAST))
    assert again.returncode == 2 and "of an earlier submission are still queued" in again.stderr  # nothing duplicated
    assert JobRecord.load(JobRecord.path_for(cfg.run_dir)).jobs == record.jobs

    followed = mtrack("status", cfg.run_dir, "--follow", timeout=120)
    assert followed.returncode == 2
    assert followed.stderr.strip() == (
        f"error: plan (job {plan_job}) can never start: SLURM keeps it pending with reason PartitionConfig "
        "(its request exceeds what the partition allows); fix the request and re-run "
        f"(cancelled the run's {len(record.jobs)} queued job(s))"
    )
    assert not _queued([j.job_id for j in record.jobs])


def test_make_rehearsal_runs_the_imagenet_recipe_on_the_local_cluster(tmp_path: Path) -> None:
    """The headline command on a small ImageNet-layout folder: refused as the recipe stands (its
    dry-run shows 8 GPUs per training job that no node has; the folder is smaller than the recipe's
    data.n_train), then rehearsed with one switch (`make rehearsal`: the recipe's storage and
    crops, a small network on the CPU, sizes from the folder) and followed to the report. Fewer
    shards, one CPU per job and no control model only to keep the test short."""
    folder = tmp_path / "imagenet"
    write_jpeg_folder(folder, "train", n_classes=4, per_class=100, sizes=((48, 36), (36, 48)), seed=0)
    write_jpeg_folder(folder, "val", n_classes=4, per_class=3, sizes=((40, 40),), seed=1)
    run_dir = tmp_path / "run"
    make = [
        "make",
        "-s",
        "-o",
        ".venv/.setup-stamp",
        f"PY={sys.executable}",
        f"IMAGENET_DIR={folder}",
        "PARTITION=debug",
    ]
    where = f"run_dir={run_dir} results_dir={tmp_path / 'results'}"

    recipe = subprocess.run(
        [*make, "imagenet-audit", f"OVERRIDES={where}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert recipe.returncode != 0
    assert (
        "  train-marked   launch.slurm.stages.train.gpus_per_node: 8 GPUs per node; no node of partition debug "
        "has a GPU" in recipe.stdout
    )
    errors = [line for line in recipe.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, recipe.stderr[-2000:]  # the folder's size, checked against the recipe before any sbatch
    assert "data.n_train=1131167 leaves no held-out images in the 400-image train split" in errors[0], errors
    assert not (run_dir / "launch").exists() and not _our_queued_jobs()

    quick = " ".join(
        [
            where,
            "train.arms=[marked]",
            "launch.mark_shards=2",
            "launch.audit_shards=1",
            "launch.slurm.summary_every_s=10",
            "launch.slurm.stages={}",
            *FAST,
        ]
    )
    run = subprocess.run(
        [*make, "rehearsal", f"OVERRIDES={quick}"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert re.search(r"^  train-marked +fits$", run.stdout, re.M)  # the rehearsal's pre-flight: no GPU asked for
    assert (tmp_path / "results" / "report.md").exists()
    lines = [line.split(" pipeline: ", 1)[1] for line in run.stderr.splitlines() if " pipeline: " in line]
    assert lines[0].startswith(
        "rehearsal on 400 images: 280 trained on, 2 member and 4 non-member users of K = 25, "
        "small_cnn for 2 epochs on the CPU"
    )
    cfg = load_config(REPO / "configs" / "imagenet-rn50.yaml", [f"data.root={folder}", f"run_dir={run_dir}"])
    plan = json.loads((run_dir / "plan" / "users.json").read_text())["users"]
    assert len(plan) == 6 and {len(u["sample_ids"]) for u in plan} == {25}
    written = json.loads((run_dir / "write" / "manifest.json").read_text())
    assert written["n_train"] == 280 and written["storage"] == cfg.data.clean_write_mode == "proportion"
    trained = json.loads((run_dir / "train-marked" / "metrics.json").read_text())
    assert trained["epochs"] == 2 and trained["precision"] in ("bf16-mixed", "32-true")
    record = JobRecord.load(JobRecord.path_for(run_dir))
    ids = {j.task: j.base_id for j in record.jobs}

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    order = [
        first(f"plan (job {ids['plan']}): running on localhost"),
        first(f"plan (job {ids['plan']}): completed after"),
        first(f"mark shards 0-1 (job {ids['mark']}): running on localhost"),
        first(f"write (job {ids['write']}): running on localhost"),
        first("train-marked: epoch 2/2 train_loss "),
        first(f"train-marked (job {ids['train-marked']}): completed"),
        first(f"audit-marked (job {ids['audit-marked']}): running"),
        first(f"report (job {ids['report']}): completed"),
    ]
    assert order == sorted(order), lines
    assert any("since submission: " in line and "pending (Dependency): " in line for line in lines)
    assert lines[-2].startswith("all 7 job(s) completed") and not _our_queued_jobs()

    status = mtrack("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert f"train-marked (job {ids['train-marked']}): completed after" in status.stdout
    assert "train-marked: epoch 2/2 train_loss" in status.stdout
    assert status.stdout.splitlines()[-1].endswith(
        "since submission: completed: plan, mark shards 0-1, write, train-marked, audit-marked, report"
    )
    assert json.loads((tmp_path / "results" / "metrics.json").read_text())["set_based"]
