"""The job plan shared by every launcher: which tasks of the DAG are left, how they are split into
(array) jobs and what they wait for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..config import RunConfig
from ..registry import Registry
from ..stages.contract import Task, dependencies, stage_for, tasks
from ..store import missing_shards

LAUNCHERS: Registry[Callable[..., None]] = Registry("--launcher")


@dataclass(frozen=True)
class Job:
    """One submission: a task, as an array over `shards` when it is a sharded stage with shards
    left to run (none left: one job that merges), waiting for the jobs of `after`."""

    task: Task
    shards: tuple[int, ...]
    after: tuple[Task, ...]

    @property
    def is_array(self) -> bool:
        return bool(self.shards)


def plan_jobs(cfg: RunConfig) -> list[Job]:
    """The jobs a run still needs, in DAG order: one per unfinished task."""
    jobs = []
    for task in tasks(cfg):
        task = replace(task, num_shards=task.spec.num_shards(cfg))
        stage = stage_for(cfg, task)
        if stage.done():
            continue
        shards = ()
        if task.num_shards > 1:
            shards = tuple(missing_shards(stage, task.num_shards))
        jobs.append(Job(task, shards, tuple(dependencies(cfg, task))))
    return jobs


def ranges(numbers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> "0-2,5,7-8": sbatch's array notation."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}-{n}" if n > start else str(n))
            start = None
    return ",".join(parts)
