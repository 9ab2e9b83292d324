"""Pre-flight check of a SLURM submission: does every job's request fit what the partition offers?

Read from the cluster itself (`scontrol show partition` and `scontrol show node`), before any
`sbatch`: a mistyped partition, a GPU request on a CPU partition or a memory request above the
node size would otherwise be refused by sbatch halfway through the DAG, or worse, accepted and left
pending for ever (reasons `PartitionConfig`, `PartitionNodeLimit`, `PartitionTimeLimit`).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from ..store import StageError
from .jobs import Job

UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "N/A")


class ClusterError(StageError):
    """SLURM's commands do not answer (no cluster here, or not a login node)."""


def scontrol(*args: str) -> str:
    """`scontrol -a -o show ...` (hidden partitions too, one record per line); its message on failure."""
    try:
        out = subprocess.run(["scontrol", "-a", "-o", "show", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"launch.slurm: SLURM does not answer here (scontrol: {exc})") from None
    if out.returncode != 0:
        raise ClusterError(f"scontrol show {' '.join(args)}: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol -o` record ("Key=value Key=value ..."; values may hold spaces) as a dict."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][\w/:]*)=", line))
    return {
        m.group(1): line[m.end() : keys[i + 1].start() if i + 1 < len(keys) else len(line)].strip()
        for i, m in enumerate(keys)
    }


def minutes(value: str) -> float | None:
    """A SLURM time ("30", "30:00", "4:00:00", "2-00:00:00", "1-12") in minutes; None when unlimited."""
    if value.upper() in UNLIMITED:
        return None
    days, _, clock = value.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        parts += [0.0] * (3 - len(parts))
        return int(days) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    return parts[0] + (parts[1] / 60 if len(parts) == 2 else 0.0)


def gres_gpus(gres: str) -> int:
    """GPUs in a node's Gres ("gpu:a100:4(S:0-1),gpu:v100:2,mps:100" -> 6; "(null)" -> 0)."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def _names(value: str | None) -> set[str] | None:
    """An Allow*/Deny* list; None for ALL or when the key is absent."""
    return None if value is None or value.upper() == "ALL" else {v for v in value.split(",") if v}


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    features: frozenset[str]


@dataclass(frozen=True)
class Partition:
    """What a partition offers: its limits and its nodes, as scontrol reports them."""

    name: str
    state: str
    max_time_min: float | None
    max_nodes: int | None
    max_cpus_per_node: int | None
    max_mem_per_node_mb: int | None
    allow_accounts: set[str] | None
    deny_accounts: set[str] | None
    allow_qos: set[str] | None
    deny_qos: set[str] | None
    nodes: tuple[Node, ...] = field(default=())

    def summary(self) -> str:
        def span(values: list[int], unit: str) -> str:
            lo, hi = min(values, default=0), max(values, default=0)
            return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"

        n = self.nodes
        limit = "unlimited" if self.max_time_min is None else f"{self.max_time_min:g} min"
        return (
            f"partition {self.name} ({len(n)} node{'s' * (len(n) != 1)}: {span([x.cpus for x in n], ' CPUs')}, "
            f"{span([x.mem_mb for x in n], ' MB')}, {span([x.gpus for x in n], ' GPUs')}; time limit {limit})"
        )


def _limit(value: str | None) -> int | None:
    return None if value is None or value.upper() in UNLIMITED else int(value)


def read_partition(name: str | None) -> Partition:
    """The partition `name` (None: the cluster's default one) and its nodes, from scontrol."""
    records = [parse_record(line) for line in scontrol("partition").splitlines() if line.strip()]
    known = [r["PartitionName"] for r in records]
    if name is None:
        chosen = next((r for r in records if r.get("Default") == "YES"), None)
        if chosen is None:
            raise StageError(
                f"launch.slurm.partition: not set, and the cluster has no default partition "
                f"(partitions: {', '.join(known)})"
            )
    else:
        chosen = next((r for r in records if r["PartitionName"] == name), None)
        if chosen is None:
            raise StageError(
                f"launch.slurm.partition: partition '{name}' does not exist on this cluster "
                f"(partitions: {', '.join(known) or 'none'})"
            )
    nodes = []
    if chosen.get("Nodes", "(null)") != "(null)":
        for line in scontrol("node", chosen["Nodes"]).splitlines():
            if not line.strip():
                continue
            node = parse_record(line)
            features = node.get("AvailableFeatures", "(null)")
            nodes.append(
                Node(
                    node["NodeName"],
                    int(node.get("CPUEfctv") or node["CPUTot"]),
                    int(node["RealMemory"]),
                    gres_gpus(node.get("Gres", "(null)")),
                    frozenset() if features == "(null)" else frozenset(features.split(",")),
                )
            )
    return Partition(
        name=chosen["PartitionName"],
        state=chosen.get("State", "UP"),
        max_time_min=minutes(chosen.get("MaxTime", "UNLIMITED")),
        max_nodes=_limit(chosen.get("MaxNodes")),
        max_cpus_per_node=_limit(chosen.get("MaxCPUsPerNode")),
        max_mem_per_node_mb=_limit(chosen.get("MaxMemPerNode")),
        allow_accounts=_names(chosen.get("AllowAccounts")),
        deny_accounts=_names(chosen.get("DenyAccounts")),
        allow_qos=_names(chosen.get("AllowQos")),
        deny_qos=_names(chosen.get("DenyQos")),
        nodes=tuple(nodes),
    )


@dataclass(frozen=True)
class Problem:
    """A request that cannot be met: the config key to change, the job, what it asks for and what
    the partition offers ("" for the job: every job)."""

    key: str
    job: str
    request: str
    limit: str

    def __str__(self) -> str:
        asks = f"{self.job} asks for {self.request}" if self.job else self.request
        return f"{self.key}: {asks}; {self.limit}"

    def short(self) -> str:
        """For the dry-run, under the job's name."""
        return f"{self.key}: {self.request}; {self.limit}"


def constraint_matches(constraint: str, features: frozenset[str]) -> bool | None:
    """Whether a node's features satisfy a plain `a&b` or `a|b` constraint; None for richer syntax
    (counts, brackets, mixed operators), which is left to SLURM."""
    if not re.fullmatch(r"[\w.-]+(?:[&|][\w.-]+)*", constraint) or ("&" in constraint and "|" in constraint):
        return None
    if "|" in constraint:
        return any(f in features for f in constraint.split("|"))
    return all(f in features for f in constraint.split("&"))


def check_partition(cfg: RunConfig, part: Partition) -> list[Problem]:
    """What keeps every job out of `part`: its state, or an account or QoS it does not allow."""
    slurm, where = cfg.launch.slurm, f"partition {part.name}"
    problems = []
    if part.state.upper() in ("DRAIN", "INACTIVE"):
        problems.append(Problem("launch.slurm.partition", "", where, f"it is {part.state} and takes no new jobs"))
    for what, value, allow, deny in (
        ("account", slurm.account, part.allow_accounts, part.deny_accounts),
        ("qos", slurm.qos, part.allow_qos, part.deny_qos),
    ):
        if value is not None and ((allow is not None and value not in allow) or (deny is not None and value in deny)):
            allowed = ", ".join(sorted(allow)) if allow is not None else f"all but {', '.join(sorted(deny or ()))}"
            problems.append(Problem(f"launch.slurm.{what}", "", f"{what} '{value}'", f"{where} allows {allowed}"))
    return problems


def _plural(n: float, unit: str) -> str:
    return f"{n:g} {unit}{'s' * (n != 1)}"


def check_job(cfg: RunConfig, job: Job, p: dict[str, Any], part: Partition) -> list[Problem]:
    """Every way this job's request (its submitit parameters `p`) exceeds what `part` offers."""
    stage, name, where = job.task.stage, job.task.name, f"partition {part.name}"
    section = f"launch.slurm.{'stages.' + stage if stage in cfg.launch.slurm.stages else 'default'}"
    tasks = p["tasks_per_node"]
    cpus, mem_mb, gpus, nodes = p["cpus_per_task"] * tasks, p["mem_gb"] * 1024, p["gpus_per_node"], p["nodes"]
    cpus_asked = f"{_plural(cpus, 'CPU')} per node" + (
        f" ({p['cpus_per_task']} per task x {tasks} tasks)" if tasks > 1 else ""
    )
    mem_asked = f"{p['mem_gb']:g} GB per node ({mem_mb:g} MB)"
    problems = []

    def largest(values: list[int], unit: str) -> str:
        return f"{where}'s largest node has {max(values, default=0)}{unit}"

    if gpus > max((n.gpus for n in part.nodes), default=0):
        has = (
            largest([n.gpus for n in part.nodes], " GPUs")
            if any(n.gpus for n in part.nodes)
            else f"no node of {where} has a GPU"
        )
        problems.append(Problem(f"{section}.gpus_per_node", name, f"{_plural(gpus, 'GPU')} per node", has))
    if cpus > max((n.cpus for n in part.nodes), default=0):
        problems.append(
            Problem(f"{section}.cpus_per_task", name, cpus_asked, largest([n.cpus for n in part.nodes], " CPUs"))
        )
    if part.max_cpus_per_node is not None and cpus > part.max_cpus_per_node:
        problems.append(
            Problem(
                f"{section}.cpus_per_task",
                name,
                cpus_asked,
                f"{where} allows {part.max_cpus_per_node} (MaxCPUsPerNode)",
            )
        )
    if mem_mb > max((n.mem_mb for n in part.nodes), default=0):
        problems.append(Problem(f"{section}.mem_gb", name, mem_asked, largest([n.mem_mb for n in part.nodes], " MB")))
    if part.max_mem_per_node_mb is not None and mem_mb > part.max_mem_per_node_mb:
        problems.append(
            Problem(
                f"{section}.mem_gb", name, mem_asked, f"{where} allows {part.max_mem_per_node_mb} MB (MaxMemPerNode)"
            )
        )
    if part.max_time_min is not None and p["timeout_min"] > part.max_time_min:
        problems.append(
            Problem(
                f"{section}.time_min",
                name,
                f"{p['timeout_min']} min",
                f"{where} allows {part.max_time_min:g} min (MaxTime)",
            )
        )
    lightning = job.task.spec.lightning  # its nodes are set by its own config key
    nodes_key = lightning.nodes if lightning is not None else section
    if part.max_nodes is not None and nodes > part.max_nodes:
        problems.append(Problem(nodes_key, name, _plural(nodes, "node"), f"{where} allows {part.max_nodes} (MaxNodes)"))
    constraint = p.get("slurm_constraint")
    if constraint and not any(constraint_matches(constraint, n.features) is not False for n in part.nodes):
        features = ", ".join(sorted(set().union(*(n.features for n in part.nodes)))) or "none"
        problems.append(
            Problem(
                "launch.slurm.constraint",
                name,
                f"nodes with '{constraint}'",
                f"no node of {where} has it (features: {features})",
            )
        )

    def node_fits(n: Node) -> bool:
        wanted = constraint is None or constraint_matches(constraint, n.features) is not False
        return n.cpus >= cpus and n.mem_mb >= mem_mb and n.gpus >= gpus and wanted

    fits = sum(node_fits(n) for n in part.nodes)
    if not problems and fits < nodes:  # each resource exists, but not on enough nodes together
        asked = f"{_plural(cpus, 'CPU')}, {mem_mb:g} MB" + (f", {_plural(gpus, 'GPU')}" if gpus else "")
        problems.append(
            Problem(
                nodes_key, name, f"{_plural(nodes, 'node')} with {asked}", f"{where} has {_plural(fits, 'such node')}"
            )
        )
    return problems


@dataclass(frozen=True)
class Preflight:
    """The outcome of the check: the partition read, and each job's problems (in DAG order)."""

    partition: Partition
    general: list[Problem]  # the partition refuses every job
    problems: dict[str, list[Problem]]  # by job

    def raise_if_unfit(self) -> None:
        """One line naming the first problem (job, request, limit) and every other key to change."""
        found = self.general + [p for ps in self.problems.values() for p in ps]
        if not found:
            return
        others = list(dict.fromkeys(p.key for p in found[1:] if p.key != found[0].key))
        also = f"; also: {', '.join(others)}" if others else ""
        raise StageError(f"{found[0]}{also}; nothing submitted (--dry-run shows each job against the partition)")


def preflight(cfg: RunConfig, requests: list[tuple[Job, dict[str, Any]]]) -> Preflight:
    """Check every job's request (its submitit parameters) against the partition it goes to, as
    scontrol describes it."""
    return preflight_against(cfg, requests, read_partition(cfg.launch.slurm.partition))


def preflight_against(cfg: RunConfig, requests: list[tuple[Job, dict[str, Any]]], part: Partition) -> Preflight:
    return Preflight(
        part, check_partition(cfg, part), {job.task.name: check_job(cfg, job, params, part) for job, params in requests}
    )


def describe_preflight(cfg: RunConfig, requests: list[tuple[Job, dict[str, Any]]]) -> str:
    """What `--dry-run` prints under the job plan: each job against the partition, or why unchecked."""
    try:
        result = preflight(cfg, requests)
    except ClusterError as exc:
        return f"pre-flight: not checked: {exc}"
    except StageError as exc:
        return f"pre-flight: {exc}"
    width = max(len(name) for name in result.problems)
    lines = [f"pre-flight against {result.partition.summary()}:", *(f"  {p.short()}" for p in result.general)]
    for name, problems in result.problems.items():
        verdicts = [p.short() for p in problems] or ["fits"]
        lines += [f"  {(name if i == 0 else '').ljust(width)}  {v}" for i, v in enumerate(verdicts)]
    return "\n".join(lines)
