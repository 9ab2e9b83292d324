"""The SLURM launcher: every unfinished task submitted through submitit, mark and audit as job
arrays (one array task per missing shard; the last shard to finish merges), write and report as
single jobs, train as one multi-task job (Lightning reads ranks from SLURM), chained with `afterok`
dependencies. Every job is checkpointable: after a preemption or time-out submitit requeues it and
the task resumes from its own state (training from Lightning's last checkpoint).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..console import attach_console
from ..stages.contract import Task
from ..stages.dag import run_task
from ..store import StageError, read_json, write_json
from .jobs import LAUNCHERS, Job, plan_jobs

log = logging.getLogger("pipeline")


def slurm_parameters(cfg: RunConfig, task: Task) -> dict[str, Any]:
    """submitit parameters of a task's job: resources from `launch.slurm`, and for training the
    tasks and nodes Lightning expects (one task per device)."""
    slurm = cfg.launch.slurm
    res = slurm.resources(task.stage)
    params: dict[str, Any] = {
        "name": f"mtrack-{task.name}", "timeout_min": res.time_min, "cpus_per_task": res.cpus_per_task,
        "mem_gb": res.mem_gb, "gpus_per_node": res.gpus_per_node, "nodes": 1, "tasks_per_node": 1,
        "slurm_array_parallelism": slurm.array_parallelism, "slurm_signal_delay_s": slurm.signal_delay_s,
        "slurm_setup": list(slurm.setup),
        # a job whose dependency failed is cancelled instead of pending forever
        "slurm_additional_parameters": {"kill-on-invalid-dep": "yes"},
    }
    if task.stage == "audit":  # one process per GPU, each scoring its own users of the shard
        params["tasks_per_node"] = max(1, res.gpus_per_node)
    if task.stage == "train":
        devices = cfg.train.devices if isinstance(cfg.train.devices, int) else 1
        if res.gpus_per_node and res.gpus_per_node != devices:
            raise StageError(f"launch.slurm.stages.train.gpus_per_node ({res.gpus_per_node}) must equal "
                             f"train.devices ({devices}): Lightning runs one task per device")
        params.update(nodes=cfg.train.num_nodes, tasks_per_node=devices)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(slurm, key) is not None:
            params[f"slurm_{key}"] = getattr(slurm, key)
    return params


def master_port(job_id: str) -> int:
    """The DDP rendezvous port of a job, from its own SLURM job id (unique per array task), spread
    over 15000-31999 (below Linux's ephemeral ports) so jobs sharing a node do not collide; Lightning's
    default uses only the id's last four digits."""
    return 15000 + int(job_id) % 17000


def _exit_now(signum: int, frame: Any) -> None:
    os._exit(0)


class StageJob:
    """One task as a submitit job. Requeued as is after a preemption or time-out (submitit's
    `checkpoint` protocol): the stage itself resumes from what it has on disk."""

    def __init__(self, cfg: RunConfig, task: Task) -> None:
        self.cfg, self.task = cfg, task

    def __call__(self, shard: int | None = None) -> str:
        import submitit

        env = submitit.JobEnvironment()
        if env.global_rank != 0:
            # submitit checkpoints and requeues from rank 0 only; other ranks would keep training
            # until SLURM kills the job, so they leave at once.
            signal.signal(signal.SIGUSR2, _exit_now)
        os.environ.setdefault("MASTER_PORT", str(master_port(os.environ.get("SLURM_JOB_ID", "0"))))
        attach_console()
        run_task(self.cfg, replace(self.task, shard=shard))
        return self.task.name

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _jobs_record(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / "launch" / "slurm-jobs.json"


ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


def _still_queued(job_ids: list[str]) -> list[str]:
    """Jobs among `job_ids` that are pending or running (squeue also lists recently ended ones)."""
    if not job_ids:
        return []
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines()] if out.returncode == 0 else []
    return [row[0] for row in rows if len(row) == 2 and row[1] not in ENDED_STATES]


@dataclass(frozen=True)
class Submitted:
    """A submitted SLURM job (one array task for sharded stages) and what it runs."""

    task: Task
    shard: int | None
    job: Any  # submitit.Job

    @property
    def label(self) -> str:
        return f"{self.task.name} shard {self.shard}" if self.shard is not None else self.task.name


def submit_slurm(cfg: RunConfig, jobs: list[Job]) -> list[Submitted]:
    """Submit the jobs in DAG order, each with afterok dependencies on the jobs of its upstream
    tasks submitted before it (finished upstream tasks need none)."""
    import submitit

    record = _jobs_record(cfg)
    if record.exists():
        previous = sorted({j.split("_")[0] for entry in read_json(record)["jobs"] for j in entry["job_ids"]})
        if queued := _still_queued(previous):
            raise StageError(f"{record}: jobs {', '.join(queued)} of an earlier submission are still queued; "
                             "wait for them or scancel them before submitting again")
    folder = Path(cfg.launch.slurm.log_dir or Path(cfg.run_dir) / "slurm").resolve() / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cfg.launch.slurm.max_requeues)
    submitted: list[Submitted] = []
    for job in jobs:
        upstream = {dep.name for dep in job.after}
        waits = sorted({s.job.job_id.split("_")[0] for s in submitted if s.task.name in upstream})
        executor.update_parameters(**slurm_parameters(cfg, job.task),
                                   slurm_dependency=f"afterok:{':'.join(waits)}" if waits else None)
        stage_job = StageJob(cfg, job.task)
        if job.is_array:
            handles = executor.map_array(stage_job, list(job.shards))
            submitted += [Submitted(job.task, shard, h) for shard, h in zip(job.shards, handles)]
        else:
            submitted.append(Submitted(job.task, None, executor.submit(stage_job)))
        log.info("%s: submitted job %s", job.task.name, submitted[-1].job.job_id.split("_")[0])
    write_json(record, {"log_dir": str(folder.parent), "jobs": [
        {"task": s.task.name, "shard": s.shard, "job_ids": [s.job.job_id]} for s in submitted]})
    return submitted


def wait_slurm(submitted: list[Submitted]) -> None:
    """Wait for every job in DAG order; on the first failure cancel what is left and say which
    task (and shard) failed and where its log is."""
    import submitit

    for item in submitted:
        try:
            item.job.result()
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
            for other in submitted:
                if not other.job.done():
                    other.job.cancel(check=False)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise StageError(f"{item.label} failed in SLURM job {item.job.job_id}: "
                             f"{lines[-1] if lines else type(exc).__name__}; log: {item.job.paths.stderr}; "
                             "fix the cause and re-run: only unfinished work is submitted") from None
        log.info("%s: job %s done", item.label, item.job.job_id)


@LAUNCHERS.register("slurm")
def run_slurm(cfg: RunConfig, config_path: str, overrides: list[str], force: bool, wait: bool = True) -> None:
    if force:
        raise StageError("--force is not supported with --launcher slurm; use a new run_dir")
    cfg = cfg.model_copy(update={"run_dir": str(Path(cfg.run_dir).resolve()),
                                 "results_dir": str(Path(cfg.results_dir).resolve())})
    jobs = plan_jobs(cfg)
    if not jobs:
        log.info("nothing to submit: every stage is done")
        return
    submitted = submit_slurm(cfg, jobs)
    if wait:
        wait_slurm(submitted)
    else:
        log.info("submitted %d job(s); follow them with squeue; re-running this command submits what is left "
                 "once they have ended", len(submitted))
