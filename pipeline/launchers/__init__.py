"""Launchers: where the stage DAG runs. The DAG, the task code and the outputs are the same for all.

- `local` runs each task in its own Python process on this machine, in order.
- `slurm` submits every unfinished task through submitit: sharded stages (mark, audit) as job arrays
  (one array task per missing shard; the last shard to finish merges), the others as single jobs,
  a Lightning stage (train) as one multi-task job (Lightning reads ranks from SLURM), chained with
  `afterok` dependencies; after a pre-flight check of every request against the partition, all or
  nothing, then followed state by state (`status` shows the same for a run submitted without waiting).

No launcher knows a stage by name: shard counts, task layouts and main loops come from each stage's
entry in `STAGES` (pipeline/stages/contract.py).

A re-run plans only what is not done: finished stages are skipped and a sharded stage resubmits
only its missing shards, so a failed array task is re-run alone. Every job is checkpointable:
after a preemption or time-out submitit requeues it and the task resumes from its own state
(training from Lightning's last checkpoint).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from ..config import RunConfig, load_config
from ..stages.contract import config_hash, stage_for, tasks
from ..store import StageError, writable_folder
from .cost import cost_table
from .follow import Follower, JobRecord, earlier_jobs, follow
from .jobs import LAUNCHERS, Job, plan_jobs, ranges
from .local import run_local
from .preflight import describe_preflight
from .slurm import check_stage_names, run_slurm, slurm_parameters

# run_local and run_slurm register in LAUNCHERS
__all__ = ["LAUNCHERS", "check_before_running", "describe", "launch", "run_local", "run_slurm", "status"]

log = logging.getLogger("pipeline")


def describe(cfg: RunConfig, jobs: list[Job], launcher: str) -> str:
    """The job plan as a table: what `--dry-run` prints before anything is submitted."""
    if not jobs:
        return f"nothing to run: every stage of {cfg.run_dir} is done"
    rows = [("job", "array tasks", "nodes x tasks", "cpus/task", "gpus/node", "mem GB", "time min", "after")]
    for job in jobs:
        if launcher == "slurm":
            p = slurm_parameters(cfg, job.task)
            shape = (
                f"{p['nodes']} x {p['tasks_per_node']}",
                str(p["cpus_per_task"]),
                str(p["gpus_per_node"]),
                f"{p['mem_gb']:g}",
                str(p["timeout_min"]),
            )
        else:
            shape = ("this machine", "-", "-", "-", "-")
        array = f"shards {ranges(job.shards)} of {job.task.num_shards}" if job.is_array else "-"
        rows.append((job.task.name, array, *shape, ",".join(t.name for t in job.after) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def check_before_running(cfg: RunConfig, force: bool = False, checked: set[str] | None = None) -> None:
    """What a config names that its schema cannot check, checked before the first stage starts
    rather than when the stage that needs it fails: the model architecture, the files it names,
    what an unfinished stage would refuse against the data source (its `check`), and that the run
    and results folders can be written (nothing is left behind by the check). `checked`: config
    hashes of stages already checked (many runs of a table share a plan), added to."""
    from ..core.models import MODELS, pretrained_state

    MODELS.lookup(cfg.train.arch)
    if cfg.train.init_weights is not None:
        if not Path(cfg.train.init_weights).is_file():
            raise StageError(f"train.init_weights: {cfg.train.init_weights} is not a file")
        pretrained_state(cfg.train.init_weights)
    if cfg.mark.ood_folder is not None and not Path(cfg.mark.ood_folder).is_dir():
        raise StageError(f"mark.ood_folder: {cfg.mark.ood_folder} is not a folder")
    for task in (t for t in tasks(cfg) if t.spec.check is not None):
        key = config_hash(cfg, task)
        if checked is not None and key in checked:
            continue
        if force or not stage_for(cfg, task).done():
            task.spec.check_config(cfg)
        if checked is not None:
            checked.add(key)
    writable_folder(cfg.run_dir, "run_dir")
    writable_folder(cfg.results_dir, "results_dir")


def launch(
    config_path: str, overrides: list[str], launcher: str, force: bool = False, dry_run: bool = False, wait: bool = True
) -> None:
    """`mtrack run`: print the job plan, then (unless a dry run) run it with the chosen launcher."""
    cfg = load_config(config_path, overrides)
    check_stage_names(cfg, config_path)
    if dry_run:
        jobs = plan_jobs(cfg)
        print(describe(cfg, jobs, launcher))
        if launcher == "slurm" and jobs:
            print(describe_preflight(cfg, [(job, slurm_parameters(cfg, job.task)) for job in jobs]))
            print("\n" + cost_table(cfg, jobs))
        return
    check_before_running(cfg, force)
    LAUNCHERS.lookup(launcher)(cfg, config_path, overrides, force, wait)
    log.info("results in %s", cfg.results_dir)


def status(run_dir: str, keep_following: bool = False) -> None:
    """`mtrack status RUN_DIR`: every job of the run's latest SLURM submission as it stands, the
    training progress so far and a summary; with `keep_following`, then follows it as `run` does."""
    path = JobRecord.path_for(run_dir)
    if not path.exists():
        raise StageError(f"{path}: not found; {run_dir} has no SLURM submission (mtrack run CONFIG --launcher slurm)")
    record = JobRecord.load(path)
    follower = Follower(record)
    if record.earlier:
        print(earlier_jobs(record))
    for line in follower.poll():
        print(line)
    print(follower.summary())
    if partial := record.unsubmitted_line():
        print(partial)
    if keep_following:
        follow(record, lambda line: print(f"{datetime.now():%H:%M:%S} {line}", flush=True), follower)
    elif problem := follower.problem():
        print(f"the run cannot finish: {problem}")
