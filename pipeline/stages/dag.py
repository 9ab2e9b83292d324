"""Running one task of the stage DAG: skip it when done, check its inputs, run it, publish it.

What the tasks are, what each reads and how its config hash is formed all come from the stage
contracts (`contract.py`). Launchers only decide where `run_task` runs.
"""

from __future__ import annotations

import logging

from ..config import RunConfig
from ..store import StageError
from .contract import STAGES, Task, context, dependencies, stage_for

log = logging.getLogger("pipeline")


def run_task(cfg: RunConfig, task: Task, force: bool = False) -> bool:
    """Run one task unless it is already done; returns True when it ran."""
    stage = stage_for(cfg, task)
    if task.shard is not None and not task.spec.sharded:
        sharded = [name for name, spec in STAGES.items() if spec.sharded]
        raise StageError(f"{task.stage}: --shard is only supported by the {' and '.join(sharded)} stages")
    if force and task.shard is not None:
        raise StageError(f"{task.name}: --force deletes the whole stage; use it without --shard")
    if not force and stage.done():
        log.info("%s: done already, skipped", task.name)
        return False
    for dep in dependencies(cfg, task):
        if not stage_for(cfg, dep).done(verify_hashes=True):
            raise StageError(f"{task.name}: needs stage '{dep.name}' finished first (in {cfg.run_dir})")
    task.spec.check_config(cfg)  # before the folder is claimed: a refused config leaves none
    if force:  # only once the inputs are known good: a refused --force leaves the finished stage as it was
        stage.invalidate()
    stage.begin()
    log.info("%s: running", task.name)
    ctx = context(cfg, task)
    task.spec.runner()(ctx)
    if cfg.wandb.enabled and task.stage != "train" and stage.done():  # train logs through Lightning
        from .tracking import publish

        publish(ctx)
    return True
