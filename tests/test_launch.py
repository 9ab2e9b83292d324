"""The job plan both launchers share, without a cluster: what --dry-run shows and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import mtrack, tiny_config

from pipeline.config import load_config
from pipeline.launchers import ranges
from pipeline.launchers.jobs import plan_jobs
from pipeline.launchers.slurm import master_port, slurm_parameters
from pipeline.store import StageError


def test_ranges_use_array_notation() -> None:
    assert ranges((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert ranges((3,)) == "3"


def test_plan_lists_every_unfinished_task_with_its_shards_and_upstream(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path), ["launch.mark_shards=3", "launch.audit_shards=2"])
    jobs = {job.task.name: job for job in plan_jobs(cfg)}
    assert list(jobs) == [
        "plan",
        "mark",
        "write",
        "train-marked",
        "train-control",
        "audit-marked",
        "audit-control",
        "report",
    ]
    assert jobs["mark"].shards == (0, 1, 2) and jobs["audit-control"].shards == (0, 1)
    assert not jobs["write"].is_array
    assert {t.name for t in jobs["audit-marked"].after} >= {"train-marked", "write"}


def test_training_job_asks_for_one_task_per_device(tmp_path: Path) -> None:
    overrides = [
        "train.devices=4",
        "train.num_nodes=2",
        "launch.slurm.stages.train.gpus_per_node=4",
        "launch.slurm.partition=gpu",
    ]
    cfg = load_config(tiny_config(tmp_path), overrides)
    train = next(job.task for job in plan_jobs(cfg) if job.task.stage == "train")
    params = slurm_parameters(cfg, train)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    assert params["slurm_partition"] == "gpu"
    audit = next(job.task for job in plan_jobs(cfg) if job.task.stage == "audit")
    assert slurm_parameters(cfg, audit)["tasks_per_node"] == 1
    multi_gpu = load_config(tiny_config(tmp_path), ["launch.slurm.stages.audit.gpus_per_node=4"])
    assert slurm_parameters(multi_gpu, audit)["tasks_per_node"] == 4  # one audit process per GPU
    bad = load_config(tiny_config(tmp_path), ["train.devices=2", "launch.slurm.stages.train.gpus_per_node=8"])
    with pytest.raises(StageError, match="must equal train.devices"):
        slurm_parameters(bad, train)


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    result = mtrack("run", str(config), "--launcher", "slurm", "--dry-run", "--set", "launch.mark_shards=4")
    assert result.returncode == 0, result.stderr
    assert "shards 0-3 of 4" in next(line for line in result.stdout.splitlines() if line.startswith("mark "))
    assert not (tmp_path / "run").exists()


def test_ddp_ports_differ_for_consecutive_and_distant_job_ids() -> None:
    ports = {master_port(str(job_id)) for job_id in (41230, 41231, 51230, 61230)}
    assert len(ports) == 4 and all(15000 <= p < 32000 for p in ports)
