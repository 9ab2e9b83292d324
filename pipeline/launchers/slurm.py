"""The SLURM launcher: every unfinished task submitted through submitit, sharded stages (mark,
audit) as job arrays (one array task per missing shard; the last shard to finish merges), the others
as single jobs, a Lightning stage (train) as one multi-task job (Lightning reads ranks from SLURM),
chained with `afterok` dependencies; what each stage needs comes from its entry in `STAGES`. Every
job is checkpointable: after a preemption or time-out submitit requeues it and the task resumes from
its own state (training from Lightning's last checkpoint).

A run is checked against its partition before anything is submitted (`preflight`), submitted all
or nothing (a refused sbatch cancels the jobs already queued), and followed state by state
(`follow`) until it completes, fails or is stuck.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..console import attach_console
from ..stages.contract import STAGES, Task, setting, stage_for
from ..stages.dag import run_task
from ..store import StageError
from .follow import JobRecord, RecordedJob, cancel, follow, query_states
from .jobs import LAUNCHERS, Job, plan_jobs
from .preflight import preflight

log = logging.getLogger("pipeline")


def check_stage_names(cfg: RunConfig, config_path: str) -> None:
    """That `launch.slurm.stages` names stages of `STAGES`, which the config, a layer below the
    stages, cannot check itself; refused as its schema refuses a key."""
    if unknown := [name for name in cfg.launch.slurm.stages if name not in STAGES]:
        raise ConfigError(
            f"{config_path}: launch.slurm.stages.{unknown[0]}: no such stage (stages: {', '.join(STAGES)})"
        )


def slurm_parameters(cfg: RunConfig, task: Task) -> dict[str, Any]:
    """submitit parameters of a task's job: resources from `launch.slurm`, and the tasks and nodes
    its stage runs (one per GPU, or Lightning's one per device)."""
    slurm, spec = cfg.launch.slurm, task.spec
    res = slurm.resources(task.stage)
    params: dict[str, Any] = {
        "name": f"mtrack-{task.name}",
        "timeout_min": res.time_min,
        "cpus_per_task": res.cpus_per_task,
        "mem_gb": res.mem_gb,
        "gpus_per_node": res.gpus_per_node,
        "nodes": 1,
        "tasks_per_node": 1,
        "slurm_array_parallelism": slurm.array_parallelism,
        "slurm_signal_delay_s": slurm.signal_delay_s,
        "slurm_setup": list(slurm.setup),
        # a job whose dependency failed is cancelled instead of pending forever
        "slurm_additional_parameters": {"kill-on-invalid-dep": "yes"},
    }
    if spec.task_per_gpu:
        params["tasks_per_node"] = max(1, res.gpus_per_node)
    if spec.lightning is not None:
        devices = setting(cfg, spec.lightning.devices)
        devices = devices if isinstance(devices, int) else 1
        if res.gpus_per_node and res.gpus_per_node != devices:
            raise StageError(
                f"launch.slurm.stages.{task.stage}.gpus_per_node ({res.gpus_per_node}) must equal "
                f"{spec.lightning.devices} ({devices}): Lightning runs one task per device"
            )
        params.update(nodes=setting(cfg, spec.lightning.nodes), tasks_per_node=devices)
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


def submit_slurm(cfg: RunConfig, jobs: list[Job], command: str = "") -> JobRecord:
    """Submit the jobs in DAG order, each with afterok dependencies on the jobs of its upstream
    tasks submitted before it (finished upstream tasks need none). All or nothing: the record is
    saved after every sbatch, and if one is refused (or the submission is interrupted) every job
    already submitted is cancelled."""
    import submitit

    path = JobRecord.path_for(cfg.run_dir)
    earlier: list[RecordedJob] = []
    if path.exists():
        before = JobRecord.load(path)
        earlier = before.earlier + before.jobs
        live = query_states([j.job_id for j in before.jobs]).items()
        if queued := sorted({job_id.split("_")[0] for job_id, state in live if state.live}):
            raise StageError(
                f"{path}: jobs {', '.join(queued)} of an earlier submission are still queued; follow "
                f"them with `mtrack status {cfg.run_dir} --follow`, or scancel them, before submitting again"
            )
    slurm = cfg.launch.slurm
    folder = Path(slurm.log_dir or Path(cfg.run_dir) / "slurm").resolve() / "%j"
    record = JobRecord(
        path,
        str(folder),
        slurm.poll_s,
        slurm.summary_every_s,
        planned=[job.task.name for job in jobs],
        command=command,
        earlier=earlier,
    )
    record.save()  # before the first sbatch: a submission killed part-way is known as such
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=slurm.max_requeues)
    try:
        for job in jobs:
            upstream = {dep.name for dep in job.after}
            waits = sorted({j.base_id for j in record.jobs if j.task in upstream}, key=int)
            executor.update_parameters(
                **slurm_parameters(cfg, job.task), slurm_dependency=f"afterok:{':'.join(waits)}" if waits else None
            )
            stage_job = StageJob(cfg, job.task)
            try:
                handles = (
                    executor.map_array(stage_job, list(job.shards)) if job.is_array else [executor.submit(stage_job)]
                )
            except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
                message = [line.removeprefix("sbatch: error: ") for line in str(exc).splitlines() if line.strip()]
                raise StageError(
                    f"{job.task.name}: sbatch refused the job: {message[-1] if message else exc}"
                ) from None
            stage_dir = str(stage_for(cfg, job.task).dir)
            lightning = job.task.spec.lightning
            epochs = setting(cfg, lightning.epochs) if lightning is not None else None
            record.add(
                [
                    RecordedJob(job.task.name, shard, h.job_id, stage_dir, epochs)
                    for shard, h in zip(job.shards or (None,), handles)
                ]
            )
            log.info("%s: submitted job %s", job.task.name, record.jobs[-1].base_id)
    except BaseException as exc:
        cancel([j.job_id for j in record.jobs])
        if record.jobs and isinstance(exc, StageError):
            ids = sorted({j.base_id for j in record.jobs}, key=int)
            raise StageError(
                f"{exc}; cancelled the {len(ids)} job(s) already submitted for this run ({', '.join(ids)})"
            ) from None
        raise
    return record


def resubmit_command(config_path: str, overrides: list[str]) -> str:
    """The command line that submits what a run still lacks (quoted for a POSIX shell)."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    return shlex.join(["mtrack", "run", config_path, "--launcher", "slurm", *sets])


@LAUNCHERS.register("slurm")
def run_slurm(cfg: RunConfig, config_path: str, overrides: list[str], force: bool, wait: bool = True) -> None:
    if force:
        raise StageError("--force is not supported with --launcher slurm; use a new run_dir")
    cfg = cfg.model_copy(
        update={"run_dir": str(Path(cfg.run_dir).resolve()), "results_dir": str(Path(cfg.results_dir).resolve())}
    )
    jobs = plan_jobs(cfg)
    if not jobs:
        log.info("nothing to submit: every stage is done")
        return
    preflight(cfg, [(job, slurm_parameters(cfg, job.task)) for job in jobs]).raise_if_unfit()
    record = submit_slurm(cfg, jobs, resubmit_command(config_path, overrides))
    if wait:
        follow(record, log.info)
    else:
        log.info(
            "submitted %d job(s); follow them with `mtrack status %s --follow`; re-running this command "
            "submits what is left once they have ended",
            len(record.jobs),
            cfg.run_dir,
        )
