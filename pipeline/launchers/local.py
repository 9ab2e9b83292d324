"""The local launcher: every task of the DAG in its own Python process on this machine, in order."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from ..config import RunConfig
from ..stages.contract import stage_for, tasks
from ..store import AlreadyReported, StageError
from .jobs import LAUNCHERS

log = logging.getLogger("pipeline")


@LAUNCHERS.register("local")
def run_local(cfg: RunConfig, config_path: str, overrides: list[str], force: bool, wait: bool = True) -> None:
    """Run each task of the DAG in its own Python process, in order, stopping at the first failure
    (always waiting). Separate processes keep every stage's memory and DDP workers to itself, as a
    cluster job would."""
    for task in tasks(cfg):
        if not force and stage_for(cfg, task).done():  # no process (a second's imports) for a finished stage
            log.info("%s: done already, skipped", task.name)
            continue
        cmd = [sys.executable, "-m", "pipeline.cli", task.stage, config_path, *(f"--set={o}" for o in overrides)]
        cmd += ["--arm", task.arm] if task.arm else []
        cmd += ["--num-shards", str(task.spec.num_shards(cfg))] if task.spec.sharded else []
        cmd += ["--force"] if force else []
        started = time.perf_counter()
        result = subprocess.run(cmd, env=os.environ.copy())
        if result.returncode == 2:  # bad input: the stage has printed its one error line
            log.info("%s: stopped; finished stages are kept and skipped when the command is run again", task.name)
            raise AlreadyReported(2)
        if result.returncode != 0:
            raise StageError(
                f"stage {task.name} failed (exit {result.returncode}); fix the cause and re-run: "
                "finished stages are skipped"
            )
        log.info("%s: %.1f s", task.name, time.perf_counter() - started)


# --- SLURM through submitit ----------------------------------------------------------------------
