"""The stage DAG: which tasks a config implies, what each depends on, and how one task runs.

A task is a stage, optionally for one arm (the marked model or the unmarked control). Its config
hash covers exactly the config sections its outputs depend on, plus the arm, so a finished task is
skipped and a changed upstream setting is detected. Launchers only decide where `run_task` runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..core.seeds import child_seed
from ..store import Stage, StageError, load_npz, read_json

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Task:
    """A stage, for one arm where the stage has arms; `shard`/`num_shards` split the users of
    sharded stages (one array task per shard; `shard=None` runs the missing shards and finishes)."""

    stage: str
    arm: str | None = None
    shard: int | None = None
    num_shards: int = 1

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.arm}" if self.arm else self.stage


# Sections of the config each stage's outputs depend on (cumulative along the chain).
STAGE_SECTIONS = {
    "plan": ("data", "plan"),
    "mark": ("data", "plan", "mark"),
    "write": ("data", "plan", "mark"),
    "train": ("data", "plan", "mark", "train"),
    "audit": ("data", "plan", "mark", "train", "audit"),
    "report": ("data", "plan", "mark", "train", "audit"),
}
ARM_STAGES = ("train", "audit")
SHARDED_STAGES = ("mark", "audit")  # users split over array tasks


def tasks(cfg: RunConfig) -> list[Task]:
    """All tasks in a valid execution order."""
    arms = cfg.train.arms
    return [Task("plan"), Task("mark"), Task("write"), *(Task("train", a) for a in arms),
            *(Task("audit", a) for a in arms), Task("report")]


def dependencies(cfg: RunConfig, task: Task) -> list[Task]:
    """Every stage whose files this task reads: each must be finished, with its files as recorded."""
    arms = cfg.train.arms
    reads = {"mark": [Task("plan")], "write": [Task("plan"), Task("mark")], "train": [Task("write")],
             "audit": [Task("plan"), Task("write"), Task("train", task.arm)],
             "report": [Task("plan"), Task("mark"), *(Task(s, a) for s in ("train", "audit") for a in arms)]}
    return reads.get(task.stage, [])


def stage_for(cfg: RunConfig, task: Task) -> Stage:
    digest = cfg.section_hash(*STAGE_SECTIONS[task.stage])
    if task.stage == "report":
        digest = f"{digest}-{'+'.join(cfg.train.arms)}"
    return Stage(Path(cfg.run_dir), task.name, f"{digest}-{task.arm}" if task.arm else digest)


# Stage modules are imported inside the runners: a process running one stage loads only what
# that stage needs (plan and mark never import torch or FFCV).


def _users(cfg: RunConfig) -> list[dict]:
    return read_json(Path(cfg.run_dir) / "plan" / "users.json")["users"]


def _run_plan(cfg: RunConfig, stage: Stage, task: Task) -> None:
    from .plan import run_plan
    from ..data.sources import load_source

    run_plan(cfg, stage, load_source(cfg.data))


def _run_mark(cfg: RunConfig, stage: Stage, task: Task) -> None:
    from .mark import run_mark
    from ..data.sources import load_source

    plan = read_json(Path(cfg.run_dir) / "plan" / "users.json")
    run_mark(cfg, stage, load_source(cfg.data), plan["users"], task.num_shards, task.shard, plan.get("owners", []))


def _run_write(cfg: RunConfig, stage: Stage, task: Task) -> None:
    from .mark import load_marked
    from ..data.sources import load_source
    from .write import run_write

    run_dir, users = Path(cfg.run_dir), _users(cfg)
    train_ids = load_npz(run_dir / "plan" / "train_ids.npz")["train_ids"]
    run_write(cfg, stage, load_source(cfg.data), users, train_ids, load_marked(run_dir / "mark", users))


def _run_train(cfg: RunConfig, stage: Stage, task: Task) -> None:
    from .train import run_train

    write = read_json(Path(cfg.run_dir) / "write" / "manifest.json")
    run_train(stage, task.arm, cfg.train, Path(cfg.run_dir) / "write", write["num_classes"], write["mean"],
              write["std"], seed=child_seed(cfg.seed, 3) % 2**31, val_every=max(1, cfg.train.epochs // 4),
              wandb=cfg.wandb, experiment=cfg.name)


def _run_audit(cfg: RunConfig, stage: Stage, task: Task) -> None:
    from .audit import run_audit

    run_dir = Path(cfg.run_dir)
    run_audit(stage, cfg.audit, run_dir / "write" / "audit.beton", run_dir / f"train-{task.arm}" / "model.pt",
              _users(cfg), task.num_shards, task.shard)


def _run_report(cfg: RunConfig, stage: Stage, task: Task) -> None:
    from .report import run_report

    run_report(stage, Path(cfg.run_dir), Path(cfg.results_dir), cfg.train.arms, f"Audit report: {cfg.name}")


RUNNERS: dict[str, Callable[[RunConfig, Stage, Task], None]] = {
    "plan": _run_plan, "mark": _run_mark, "write": _run_write,
    "train": _run_train, "audit": _run_audit, "report": _run_report,
}


def run_task(cfg: RunConfig, task: Task, force: bool = False) -> bool:
    """Run one task unless it is already done; returns True when it ran."""
    stage = stage_for(cfg, task)
    if task.shard is not None and task.stage not in SHARDED_STAGES:
        raise StageError(f"{task.stage}: --shard is only supported by the {' and '.join(SHARDED_STAGES)} stages")
    if force and task.shard is not None:
        raise StageError(f"{task.name}: --force deletes the whole stage; use it without --shard")
    if not force and stage.done():
        log.info("%s: done already, skipped", task.name)
        return False
    for dep in dependencies(cfg, task):
        if not stage_for(cfg, dep).done(verify_hashes=True):
            raise StageError(f"{task.name}: needs stage '{dep.name}' finished first (in {cfg.run_dir})")
    if force:  # only once the inputs are known good: a refused --force leaves the finished stage as it was
        stage.invalidate()
    stage.begin()
    log.info("%s: running", task.name)
    RUNNERS[task.stage](cfg, stage, task)
    if cfg.wandb.enabled and task.stage != "train" and stage.done():  # train logs through Lightning
        from .tracking import publish

        publish(cfg, stage, task.stage)
    return True
