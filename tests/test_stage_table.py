"""The stage table is the one place a stage is declared: a toy stage added to `STAGES` (a sharded,
per-arm re-scoring after the audit, its shard count in its own config section) is in the DAG, the
job plan and its dry run, the cost estimate, the pre-flight check, the command line and the names
`launch.slurm.stages` takes, with no launcher code touched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_config
from pydantic import BaseModel, ConfigDict, Field

from pipeline.cli import build_parser
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.launchers import describe, launch
from pipeline.launchers.cost import cost_table, estimate_job, load_rates
from pipeline.launchers.jobs import plan_jobs
from pipeline.launchers.preflight import Node, Partition, preflight_against
from pipeline.launchers.slurm import check_stage_names, slurm_parameters
from pipeline.stages.contract import (
    SHARD_FILES,
    STAGES,
    Loop,
    Read,
    StageSpec,
    Task,
    config_hash,
    dependencies,
    tasks,
    users_images,
)

TOY_RESOURCES = ["launch.slurm.stages.recheck.gpus_per_node=2", "launch.slurm.stages.recheck.time_min=30"]


class RecheckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    shards: int = Field(3, ge=1)


class ToyRunConfig(RunConfig):
    """The run config with the toy stage's section, as adding it to config.py would make it."""

    recheck: RecheckConfig = RecheckConfig()


RECHECK = StageSpec(
    "recheck",
    config=("recheck",),
    reads={"users": Read("plan", "users.json"), "losses": Read("audit", "losses.npz", arm="same")},
    writes=(*SHARD_FILES, "rechecked.json"),
    run="recheck:run_recheck",  # never imported: nothing here runs it
    arms=True,
    unhashed=("recheck.shards",),
    shards="recheck.shards",
    task_per_gpu=True,
    loop=Loop(lambda cfg: [(users_images(cfg), cfg.data.image_size)], "audit", runs_on="gpu", model="train.arch"),
)


@pytest.fixture
def toy_stage() -> Iterator[None]:
    """STAGES with the toy stage after the audit, changed in place (every module holds this dict)."""
    saved = dict(STAGES)
    STAGES.clear()
    for name, spec in saved.items():
        STAGES[name] = spec
        if name == "audit":
            STAGES["recheck"] = RECHECK
    yield
    STAGES.clear()
    STAGES.update(saved)


def _partition(gpus: int) -> Partition:
    """One node of 16 CPUs, 64 GB and `gpus` GPUs, no limits."""
    node = Node("n1", 16, 64 * 1024, gpus, frozenset())
    return Partition("gpu", "UP", None, None, None, None, None, None, None, None, (node,))


def _config(folder: Path, shards: int = 3) -> ToyRunConfig:
    base = load_config(tiny_config(folder), TOY_RESOURCES)
    return ToyRunConfig(**base.model_dump(), recheck=RecheckConfig(shards=shards))


def test_the_toy_stage_is_in_the_dag_after_what_it_reads(toy_stage: None, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert [task.name for task in tasks(cfg)] == [
        "plan",
        "mark",
        "write",
        "train-marked",
        "train-control",
        "audit-marked",
        "audit-control",
        "recheck-marked",
        "recheck-control",
        "report",
    ]
    assert [dep.name for dep in dependencies(cfg, Task("recheck", "control"))] == ["plan", "audit-control"]
    marked = Task("recheck", "marked")
    assert config_hash(cfg, marked) == config_hash(_config(tmp_path, shards=5), marked)  # how it is split: unhashed
    other_audit = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"fdr_nonmembers": 3})})
    assert config_hash(other_audit, marked) != config_hash(cfg, marked)  # what it reads: hashed


def test_the_toy_stage_is_planned_launched_costed_and_checked(toy_stage: None, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    check_stage_names(cfg, "toy.yaml")  # launch.slurm.stages.recheck names a stage now
    jobs = plan_jobs(cfg)
    job = next(job for job in jobs if job.task.name == "recheck-marked")
    assert job.shards == (0, 1, 2) and [t.name for t in job.after] == ["plan", "audit-marked"]
    params = slurm_parameters(cfg, job.task)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 2, 2)  # a task per GPU
    row = next(line.split() for line in describe(cfg, jobs, "slurm").splitlines() if line.startswith("recheck-marked"))
    assert row[1:] == ["shards", "0-2", "of", "3", "1", "x", "2", "2", "2", "8", "30", "plan,audit-marked"]

    # scored like the audit: at the audit's throughput for the run's model, per GPU
    bench = tmp_path / "bench"
    bench.mkdir()
    audit_rate = {"per": "GPU", "what": "a", "arch": "small_cnn", "images_per_s": {"16": 1000}}
    (bench / "gpu.json").write_text(
        json.dumps({"rows": [], "device": "cuda", "gpu": {"name": "Test GPU"}, "throughput": {"audit": audit_rate}})
    )
    estimate = estimate_job(cfg, job, load_rates(bench))
    images = (4 + 20) * 8  # every user's images, split over 3 array tasks of 2 GPUs each
    assert (estimate.images, estimate.gpus) == (images, 6)
    assert estimate.wall_s == pytest.approx(images / 3 / (1000 * 2))
    table = cost_table(cfg, jobs, bench).splitlines()
    assert next(line for line in table if line.startswith("recheck-control")).endswith(
        "[1] img/s per GPU: 1,000 at 16 px; x 2 GPUs"
    )

    requests = [(job, slurm_parameters(cfg, job.task)) for job in jobs]
    problems = {
        name: [str(p) for p in found]
        for name, found in preflight_against(cfg, requests, _partition(gpus=1)).problems.items()
    }
    assert problems.pop("recheck-marked") == [
        "launch.slurm.stages.recheck.gpus_per_node: recheck-marked asks for 2 GPUs per node; partition gpu's "
        "largest node has 1 GPUs"
    ]
    assert problems.pop("recheck-control") and not any(problems.values())
    assert not any(preflight_against(cfg, requests, _partition(gpus=2)).problems.values())


def test_the_command_line_has_the_toy_stage_with_its_arm_and_shards(toy_stage: None) -> None:
    args = build_parser().parse_args(["recheck", "toy.yaml", "--arm", "marked", "--shard", "1", "--num-shards", "3"])
    assert (args.command, args.arm, args.shard, args.num_shards) == ("recheck", "marked", 1, 3)


def test_launch_slurm_stages_takes_only_the_names_of_the_table(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    with pytest.raises(ConfigError) as refused:
        launch(str(config), TOY_RESOURCES, "slurm", dry_run=True)
    assert str(refused.value) == (
        f"{config}: launch.slurm.stages.recheck: no such stage (stages: plan, mark, write, train, audit, report)"
    )
