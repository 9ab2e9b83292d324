"""Watching a run on SLURM: the job record, job states from squeue/sacct, and the follower.

The record (`<run_dir>/launch/slurm-jobs.json`) is written as each job is submitted, so a run
interrupted mid-submission still knows what it queued. The follower polls SLURM and prints one line
per state change (pending with its reason, running on which node, completed, failed) in the order
they happened, training's per-epoch progress from its Lightning CSV log, and a one-line summary
while nothing changes. A failed job, or one SLURM keeps pending for a reason that cannot resolve by
itself, ends the run: the rest is cancelled and the error names the job.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError

from ..config import StrictModel, validation_problem
from ..store import StageError, read_json, write_json
from .jobs import ranges

# States a job can still leave on its own (squeue's long names).
LIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}
# Ended without success. A preempted job or one whose node failed may be requeued by SLURM: it
# counts as failed only if it is still in that state at the next poll.
FAILED_STATES = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}
MAY_BE_REQUEUED = {"PREEMPTED", "NODE_FAIL"}
PASSING_STATES = {"COMPLETING", "CONFIGURING"}  # not reported: the state the job settles in is
# Pending reasons that do not resolve by themselves (SLURM's job reason codes).
STUCK_REASONS = {
    "PartitionConfig": "its request exceeds what the partition allows",
    "PartitionTimeLimit": "its time limit exceeds the partition's",
    "BadConstraints": "no node satisfies its constraints",
    "DependencyNeverSatisfied": "a job it waits for did not succeed",
    "InvalidAccount": "its account is invalid",
    "InvalidQOS": "its QOS is invalid",
    "AccountNotAllowed": "the partition does not allow its account",
    "QOSNotAllowed": "the partition does not allow its QOS",
}
PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*PerJob")  # a per-job limit of the QOS or association


@dataclass(frozen=True)
class RecordedJob:
    """One submitted SLURM job (an array task for sharded stages) and where its stage writes."""

    task: str
    shard: int | None
    job_id: str
    stage_dir: str
    epochs: int | None = None  # training: epochs it runs, for "epoch n/N"

    @property
    def base_id(self) -> str:
        return self.job_id.split("_")[0]

    @property
    def label(self) -> str:
        return (
            f"{self.task} shard {self.shard} (job {self.job_id})"
            if self.shard is not None
            else f"{self.task} (job {self.job_id})"
        )


def _job_id(text: str) -> str:
    """squeue's ids: a job, or an array task `<job>_<task>` (they go on squeue/sacct/scancel command lines)."""
    if not re.fullmatch(r"[0-9]{1,18}(_[0-9]{1,9})?", text):
        raise ValueError(f"{text!r:.40} is not a SLURM job id (digits, or <job>_<task> for an array task)")
    return text


class _RecordedEntry(StrictModel):
    task: str
    shard: Annotated[int, Field(ge=0)] | None
    job_ids: list[Annotated[str, AfterValidator(_job_id)]]
    stage_dir: str
    epochs: Annotated[int, Field(ge=1)] | None


class _RecordFile(StrictModel):
    """The job record's schema: checked whole when read, so an edited or foreign record is refused
    naming the field instead of failing later in a sum, a sort or an squeue call."""

    folder: str
    poll_s: Annotated[float, Field(gt=0)]
    summary_every_s: Annotated[float, Field(gt=0)]
    submitted_at: Annotated[float, Field(ge=0)]  # epoch seconds
    jobs: list[_RecordedEntry]
    planned: list[str] = []
    command: str = ""
    earlier: list[_RecordedEntry] = []


def _entries(jobs: list[RecordedJob]) -> list[dict[str, Any]]:
    return [
        {"task": j.task, "shard": j.shard, "job_ids": [j.job_id], "stage_dir": j.stage_dir, "epochs": j.epochs}
        for j in jobs
    ]


def _jobs(entries: list[_RecordedEntry]) -> list[RecordedJob]:
    return [RecordedJob(e.task, e.shard, job_id, e.stage_dir, e.epochs) for e in entries for job_id in e.job_ids]


@dataclass
class JobRecord:
    """`<run_dir>/launch/slurm-jobs.json`: every job of the latest submission, saved after each sbatch,
    with the tasks it meant to submit (written before the first sbatch, so a submission killed
    part-way is known as such), the command that submits the rest, and the jobs of earlier submissions."""

    path: Path
    folder: str  # submitit's job folder pattern (`.../%j`): logs and results
    poll_s: float = 10
    summary_every_s: float = 300
    submitted_at: float = field(default_factory=time.time)  # epoch seconds
    jobs: list[RecordedJob] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)  # task names this submission was to submit
    command: str = ""  # what submits what is left
    earlier: list[RecordedJob] = field(default_factory=list)  # every job of the run's earlier submissions

    @staticmethod
    def path_for(run_dir: str | Path) -> Path:
        return Path(run_dir) / "launch" / "slurm-jobs.json"

    @classmethod
    def load(cls, path: Path) -> JobRecord:
        try:
            data = _RecordFile.model_validate(read_json(path), strict=True)
        except ValidationError as exc:
            raise StageError(
                f"{path}: {validation_problem(exc)}; not a job record of this version; check its jobs with squeue, "
                "then delete it"
            ) from None
        return cls(
            path,
            data.folder,
            data.poll_s,
            data.summary_every_s,
            data.submitted_at,
            _jobs(data.jobs),
            data.planned,
            data.command,
            _jobs(data.earlier),
        )

    def add(self, jobs: list[RecordedJob]) -> None:
        self.jobs += jobs
        self.save()

    def save(self) -> None:
        write_json(
            self.path,
            {
                "folder": self.folder,
                "poll_s": self.poll_s,
                "summary_every_s": self.summary_every_s,
                "submitted_at": self.submitted_at,
                "jobs": _entries(self.jobs),
                "planned": self.planned,
                "command": self.command,
                "earlier": _entries(self.earlier),
            },
        )

    @property
    def unsubmitted(self) -> list[str]:
        """Tasks this submission meant to submit but never did (it was killed part-way)."""
        submitted = {j.task for j in self.jobs}
        return [task for task in self.planned if task not in submitted]

    def unsubmitted_line(self) -> str | None:
        if not (missing := self.unsubmitted):
            return None
        return (
            f"the submission stopped part-way: {', '.join(missing)} never submitted; "
            f"submit the rest with `{self.command or 'mtrack run CONFIG --launcher slurm'}`"
        )

    def stderr(self, job: RecordedJob) -> Path:
        from submitit.core.utils import JobPaths

        return JobPaths(self.folder, job.job_id).stderr


@dataclass(frozen=True)
class JobState:
    """A job as SLURM reports it: state, pending reason, node list, start and end times."""

    state: str
    reason: str = ""
    node: str = ""
    start: str = ""
    end: str = ""

    @property
    def change(self) -> tuple[str, str, str]:
        """What a state line reports: a change here is a new line."""
        return self.state, self.reason if self.state == "PENDING" else "", self.node if self.state == "RUNNING" else ""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def event_time(self) -> datetime:
        """When this state began (start for running, end for ended); now when SLURM has no time."""
        stamp = self.start if self.state == "RUNNING" else self.end if not self.live else ""
        try:
            return datetime.fromisoformat(stamp)
        except ValueError:
            return datetime.now()

    @property
    def order(self) -> int:
        """Of changes within the same second: jobs ending come before jobs starting, then pending ones."""
        return 1 if not self.live else 2 if self.state == "RUNNING" else 3

    @property
    def brief(self) -> str:
        """ "pending (Priority)", "running", "completed": how the summary groups jobs."""
        if self.state == "PENDING":
            return f"pending ({self.reason})" if self.reason and self.reason != "None" else "pending"
        return self.state.lower().replace("_", " ")

    def describe(self) -> str:
        """ "pending (Priority)", "running on node1", "completed after 1m02s", "failed after 3s"."""
        if self.state == "RUNNING":
            return f"running on {self.node}"
        try:
            took = datetime.fromisoformat(self.end) - datetime.fromisoformat(self.start)
        except ValueError:
            return self.brief
        return f"{self.brief} after {duration(took.total_seconds())}" if not self.live else self.brief


def duration(seconds: float) -> str:
    """83 -> "1m23s"; 7300 -> "2h01m"."""
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _slurm_rows(cmd: list[str]) -> list[list[str]]:
    """`|`-separated rows of a squeue/sacct call; none when it fails (unknown ids, no accounting)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split("|") for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def query_states(job_ids: list[str]) -> dict[str, JobState]:
    """The state of each job (array tasks as `<id>_<task>`): from squeue while SLURM still holds the
    job, from sacct once it has been purged from the controller."""
    if not job_ids:
        return {}
    bases = ",".join(sorted({j.split("_")[0] for j in job_ids}, key=int))
    states = {
        row[0]: JobState(*row[1:6])
        for row in _slurm_rows(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%r|%N|%S|%e", "-j", bases])
        if len(row) == 6
    }
    if missing := [j for j in job_ids if j not in states]:
        ids = ",".join(sorted({j.split("_")[0] for j in missing}, key=int))
        for row in _slurm_rows(["sacct", "-X", "-P", "-n", "-j", ids, "-o", "JobID,State,Reason,NodeList,Start,End"]):
            if len(row) == 6 and row[0] in missing:  # "CANCELLED by 0" -> CANCELLED
                states[row[0]] = JobState(row[1].split()[0], *row[2:6])
    return {j: states[j] for j in job_ids if j in states}


def cancel(job_ids: list[str]) -> None:
    """scancel every job (whole arrays by their base id) in one call."""
    if bases := sorted({j.split("_")[0] for j in job_ids}, key=int):
        subprocess.run(["scancel", *bases], capture_output=True, timeout=60)


def _missing_nodes(reason: str) -> str | None:
    """For `ReqNodeNotAvail, UnavailableNodes:n[1-2]`: the nodes when they do not exist at all."""
    nodes = reason.partition("UnavailableNodes:")[2].strip()
    if not nodes:
        return None
    out = subprocess.run(["scontrol", "show", "node", nodes], capture_output=True, text=True, timeout=60)
    return nodes if out.returncode != 0 else None


def stuck_reason(reason: str) -> str | None:
    """Why a pending job can never start, or None when its reason may still resolve."""
    if reason in STUCK_REASONS:
        return STUCK_REASONS[reason]
    if PER_JOB_LIMIT.match(reason):
        return "it exceeds a per-job limit of its QOS or association"
    if reason.startswith("ReqNodeNotAvail") and (nodes := _missing_nodes(reason)):
        return f"it needs nodes {nodes}, which do not exist"
    return None


def epoch_metrics(stage_dir: Path) -> tuple[float, dict[int, dict[str, float]]]:
    """When training's Lightning CSV log was last written, and its metrics per epoch (from every
    version: a resumed run starts a new one; complete rows only, the file may be half-written)."""
    epochs: dict[int, dict[str, float]] = {}
    written = 0.0
    versions = sorted(stage_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in versions:
        try:
            text, written = path.read_text(), max(written, path.stat().st_mtime)
        except OSError:
            continue
        text = text[: text.rfind("\n") + 1]
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("epoch"):
                epochs.setdefault(int(row["epoch"]), {}).update(
                    {k: float(v) for k, v in row.items() if v and k != "epoch"}
                )
    return written, epochs


class Follower:
    """Polls the jobs of a record and turns what changed into lines; decides when the run is over."""

    def __init__(self, record: JobRecord, just_submitted: bool = False) -> None:
        self.record = record
        # A run followed from its submission: every job was waiting then, even one that ended before the first poll
        self.submitted_waiting = {j.job_id for j in record.jobs} if just_submitted else set()
        self.states: dict[str, JobState] = {}
        self.epochs_shown: dict[str, int] = {}
        self.suspect: set[str] = set()  # seen once in a state SLURM may requeue from
        self.resumes_shown: dict[str, int] = {}

    def poll(self) -> list[str]:
        """Lines for everything that changed since the last poll, in the order it happened."""
        return self.update(query_states([j.job_id for j in self.record.jobs]))

    def update(self, now: dict[str, JobState]) -> list[str]:
        """Take in the jobs' states as SLURM reports them now; lines for what changed, in the order it
        happened (within one second: epochs, then jobs ending, then jobs starting, then pending ones)."""
        now = {j: s for j, s in now.items() if s.state not in PASSING_STATES}
        changed = [
            (job, now[job.job_id])
            for job in self.record.jobs
            if job.job_id in now
            and (job.job_id not in self.states or now[job.job_id].change != self.states[job.job_id].change)
        ]
        # A job known waiting that started and ended between two polls still gets its "running on" line
        unseen_runs = [
            (job, JobState("RUNNING", node=state.node, start=state.start))
            for job, state in changed
            if not state.live and state.node and state.start and self._was_waiting(job.job_id)
        ]
        self.suspect = {j for j, s in self.states.items() if s.state in MAY_BE_REQUEUED and now.get(j) == s}
        self.states.update(now)
        started = [((second, 0), line) for (second, _), line in self._state_events(unseen_runs)]  # before its end
        events = started + self._state_events(changed) + self._progress_events()
        return [line for _, line in sorted(events, key=lambda e: e[0])]

    def _was_waiting(self, job_id: str) -> bool:
        seen = self.states.get(job_id)
        return seen.state == "PENDING" if seen else job_id in self.submitted_waiting

    def _state_events(self, changes: list[tuple[RecordedJob, JobState]]) -> list[tuple[tuple[int, int], str]]:
        """One line per change, keyed for ordering; array tasks of one stage that changed alike share a line."""
        groups: dict[tuple[Any, ...], list[tuple[RecordedJob, JobState]]] = {}
        for job, state in changes:
            same = (job.task, job.base_id, state.describe()) if job.shard is not None else (job.job_id,)
            groups.setdefault(same, []).append((job, state))
        events = []
        for members in groups.values():
            job, state = members[0]
            label = (
                job.label
                if len(members) == 1
                else f"{job.task} shards {ranges(tuple(sorted(j.shard for j, _ in members)))} (job {job.base_id})"
            )
            first = min(int(s.event_time().timestamp()) for _, s in members)
            events.append(((first, state.order), f"{label}: {state.describe()}"))
        return events

    def _progress_events(self) -> list[tuple[tuple[int, int], str]]:
        """New epochs of every training job that has started, keyed by when its log was written."""
        events = []
        for job in self.record.jobs:
            state = self.states.get(job.job_id)
            if job.epochs is None or state is None or state.state == "PENDING":
                continue
            resumes_path = Path(job.stage_dir) / "resumes.json"
            resumes = read_json(resumes_path) if resumes_path.exists() else []
            already = self.resumes_shown.get(job.task, 0)
            for n, resume in enumerate(resumes[already:], already):
                requeue = f", after SLURM requeue {resume['requeues']}" if resume.get("requeues") else ""
                events.append(
                    (
                        (int(resume.get("at", 0)), 0),
                        f"{job.task}: resumed ({n + 1}) from its checkpoint at step {resume['step']}, "
                        f"epoch {resume['epoch']}{requeue}",
                    )
                )
                self.resumes_shown[job.task] = n + 1
            written, epochs = epoch_metrics(Path(job.stage_dir))
            for epoch, values in sorted(epochs.items()):
                if epoch < self.epochs_shown.get(job.task, 0) or "train_loss" not in values:
                    continue
                shown = " ".join(
                    f"{k} {values[k]:.4g}" for k in ("train_loss", "train_acc", "val_loss", "val_acc") if k in values
                )
                events.append(((int(written), 0), f"{job.task}: epoch {epoch + 1}/{job.epochs} {shown}"))
                self.epochs_shown[job.task] = epoch + 1
        return events

    def summary(self) -> str:
        """One line: how long since submission, and every job by state."""
        by_state: dict[str, dict[str, list[RecordedJob]]] = {}
        for job in self.record.jobs:
            state = self.states.get(job.job_id)
            text = state.brief if state else "unknown to squeue and sacct"
            by_state.setdefault(text, {}).setdefault(job.task, []).append(job)

        def name(task: str, jobs: list[RecordedJob]) -> str:
            shards = tuple(sorted(j.shard for j in jobs if j.shard is not None))
            return f"{task} shards {ranges(shards)}" if shards else task

        parts = [
            f"{text}: {', '.join(name(task, jobs) for task, jobs in tasks.items())}" for text, tasks in by_state.items()
        ]
        return f"{duration(time.time() - self.record.submitted_at)} since submission: " + "; ".join(parts)

    def problem(self) -> str | None:
        """Why the run cannot finish (the first failed job, or one stuck pending), or None."""
        failed = [
            (j, s)
            for j in self.record.jobs
            if (s := self.states.get(j.job_id))
            and s.state in FAILED_STATES
            and (s.state not in MAY_BE_REQUEUED or j.job_id in self.suspect)
        ]
        if failed:
            job, state = min(failed, key=lambda c: c[1].event_time())
            return (
                f"{job.task}{'' if job.shard is None else f' shard {job.shard}'} failed in SLURM job {job.job_id} "
                f"({state.state.lower()}): {self._failure_message(job)}; log: {self.record.stderr(job)}; "
                "fix the cause and re-run: only unfinished work is submitted"
            )
        for job in self.record.jobs:
            state = self.states.get(job.job_id)
            if state and state.state == "PENDING" and (why := stuck_reason(state.reason)):
                return (
                    f"{job.label} can never start: SLURM keeps it pending with reason {state.reason} ({why}); "
                    "fix the request and re-run"
                )
        return None

    def _failure_message(self, job: RecordedJob) -> str:
        """The exception the task raised (from submitit's result file), else the log's last line."""
        import submitit

        handle = submitit.SlurmJob(self.record.folder, job.job_id)
        if handle.paths.result_pickle.exists() and (error := handle.exception()) is not None:
            text = str(error)  # "... with trace:\n-----\n<traceback>\n-----\n<where the logs are>"
        else:
            stderr = self.record.stderr(job)
            text = stderr.read_text(errors="replace") if stderr.exists() else ""
        trace = text.split("-" * 22)
        lines = [line.strip() for line in (trace[1] if len(trace) > 2 else text).splitlines() if line.strip()]
        return lines[-1] if lines else "it left no result and no log"

    @property
    def finished(self) -> bool:
        return all(self.states.get(j.job_id, JobState("")).state == "COMPLETED" for j in self.record.jobs)

    def cancel_rest(self) -> int:
        """Cancel every job of the record that has not ended; how many."""
        live = [j.job_id for j in self.record.jobs if self.states.get(j.job_id, JobState("PENDING")).live]
        cancel(live)
        return len(live)


def earlier_jobs(record: JobRecord) -> str:
    """One line: every job of the run's earlier submissions, grouped by how it ended."""
    states = query_states([j.job_id for j in record.earlier])
    by_state: dict[str, list[str]] = {}
    for job in record.earlier:
        state = states.get(job.job_id)
        by_state.setdefault(state.brief if state else "unknown to squeue and sacct", []).append(job.label)
    return "earlier submissions: " + "; ".join(f"{text}: {', '.join(jobs)}" for text, jobs in by_state.items())


def follow(record: JobRecord, emit: Callable[[str], None], follower: Follower | None = None) -> None:
    """Print state changes and progress until every job completed; on a failed or stuck job,
    cancel the rest and raise one line naming it."""
    follower = follower or Follower(record, just_submitted=True)
    last_line = time.monotonic()
    try:
        while True:
            lines = follower.poll()
            for line in lines:
                emit(line)
            if problem := follower.problem():
                cancelled = follower.cancel_rest()
                raise StageError(f"{problem} (cancelled the run's {cancelled} queued job(s))" if cancelled else problem)
            if follower.finished:
                if partial := record.unsubmitted_line():
                    raise StageError(f"the {len(record.jobs)} submitted job(s) completed, but {partial}")
                emit(
                    f"all {len(record.jobs)} job(s) completed, "
                    f"{duration(time.time() - record.submitted_at)} after submission"
                )
                return
            now = time.monotonic()
            if lines:
                last_line = now
            elif now - last_line >= record.summary_every_s:
                emit(follower.summary())
                last_line = now
            time.sleep(record.poll_s)
    except KeyboardInterrupt:
        emit(f"stopped following; the jobs keep running: mtrack status {record.path.parent.parent} --follow")
        raise
