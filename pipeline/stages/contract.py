"""Stage contracts: what each stage reads from the config and from earlier stages, and what it writes.

Every stage is declared once, in `STAGES`. From those declarations come the DAG (its tasks and
dependencies), each task's config hash (the config it declares plus the hashes of the stages it
reads, so a changed upstream setting reaches every stage downstream and nothing else does), every
path into the run directory, and the typed `Context` a stage runs with: its config sections and
nothing else, its input paths and its output folder. The launchers, the cost estimate, the
pre-flight check and the command line read what they need to know of a stage (its shard count, how
its SLURM job maps tasks to devices, its main loop) from the same entry: adding a stage is its
module, its entry here and its config section.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from ..config import RunConfig, WandbConfig
from ..store import Stage, StageError, file_sha256, read_json

ARMS = ("marked", "control")
MANIFEST = "manifest.json"  # every finished stage has one; a stage may read an upstream stage's


@dataclass(frozen=True)
class Read:
    """A file of an earlier stage; `file` may depend on the reading task's arm ({arm: file}: the
    marked model trains on another file than the control). `arm`: which arms of a stage with arms
    are read: "same" (the reading task's), "all" (a path per arm of the run) or one named arm."""

    stage: str
    file: str | dict[str, str]
    arm: Literal["same", "all", "marked", "control"] | None = None

    def file_for(self, arm: str | None) -> str:
        if isinstance(self.file, str):
            return self.file
        if arm not in self.file:
            raise StageError(f"stage '{self.stage}': no file declared for arm {arm}")
        return self.file[arm]


def setting(cfg: RunConfig, key: str) -> Any:
    """The value of a dotted config key ("launch.mark_shards")."""
    return functools.reduce(getattr, key.split("."), cfg)


@dataclass(frozen=True)
class Lightning:
    """A stage Lightning runs, as its SLURM job must be laid out: one task per device, `devices`
    tasks per node on `nodes` nodes, its GPUs per node equal to its devices (Lightning reads ranks
    from SLURM); followed epoch by epoch (`epochs` of them) in Lightning's CSV log. Dotted config keys."""

    devices: str
    nodes: str
    epochs: str


@dataclass(frozen=True)
class Loop:
    """What a stage pushes through its main loop, for the cost estimate of a SLURM run. `passes`:
    (images, side in px) of each pass, all split over its shards (training: one per epoch, at that
    epoch's crop size); `throughput`: the benchmark rate that sets its pace, by its name in
    results/bench/ ("mark", "write", "train", "audit"); `runs_on`: "cpu", "gpu" (not estimated on
    CPU) or "either": on its job's GPUs when it has some, unless its `device` key says "cpu" or
    "numpy". On GPUs each of its tasks drives one; on CPU each task is one core, or `workers`
    processes. `model`: the key of the model a rate must have been measured with. Keys are dotted."""

    passes: Callable[[RunConfig], list[tuple[int, int]]]
    throughput: str
    runs_on: Literal["cpu", "gpu", "either"] = "either"
    device: str | None = None
    workers: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class StageSpec:
    """One stage's contract. `config`: the top-level config keys (sections or scalars) its outputs
    depend on, the only ones it may read; `reads`: named inputs from earlier stages; `writes`: the
    files it leaves in its folder (glob patterns for shard files); `run`: "module:function" under
    pipeline.stages, imported only when the stage runs (plan and mark never load torch or FFCV).
    `unhashed`: dotted keys of its declared config that it reads but that change none of its outputs
    (which arms a run trains does not change any one arm's model), so runs differing only there
    share the stage. `check`: "module:function" checking its config against the data source's
    metadata, writing nothing: run before any stage of a run starts, so a config only this stage
    could refuse leaves no stage folder behind. `files`: dotted keys naming files outside the run
    that it reads (weights to start from): their content joins its hash, so a replaced file re-runs
    the stage instead of leaving outputs made from the old one.

    How it is launched: `shards`, the dotted config key of the number of array tasks its users are
    split over (None: not sharded); `task_per_gpu`: its SLURM job runs one task per GPU of its node
    (each scoring its own users) instead of one; `lightning`: Lightning's layout instead; `loop`: its
    main loop, for the cost estimate (None: not estimated)."""

    name: str
    config: tuple[str, ...]
    reads: dict[str, Read]
    writes: tuple[str, ...]
    run: str
    arms: bool = False
    unhashed: tuple[str, ...] = ()
    shards: str | None = None
    task_per_gpu: bool = False
    lightning: Lightning | None = None
    loop: Loop | None = None
    check: str | None = None
    files: tuple[str, ...] = ()

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    def num_shards(self, cfg: RunConfig) -> int:
        return int(setting(cfg, self.shards)) if self.shards is not None else 1

    def runner(self) -> Callable[[Context], None]:
        return cast(Callable[["Context"], None], _function(self.run))

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse (StageError, DataSourceError) a config this stage would refuse, before anything runs."""
        if self.check is not None:
            _function(self.check)(cfg)

    def declares(self, file: str) -> bool:
        return file == MANIFEST or any(fnmatch.fnmatch(file, pattern) for pattern in self.writes)


def _function(name: str) -> Callable[..., Any]:
    """`module:function` under pipeline.stages, imported only when called (plan and mark never load torch)."""
    module, function = name.split(":")
    return cast(Callable[..., Any], getattr(importlib.import_module(f"pipeline.stages.{module}"), function))


SHARD_FILES = ("shard-*-of-*.npz", "shard-*-of-*.json")
REPORT_FILES = (
    "metrics.json",
    "report.md",
    "roc.png",
    "loss_hist.png",
    "p_values.png",
    "classes.png",
    "marked_examples.png",
)  # classes.png: with a marked arm
TEST_IMAGES_UNKNOWN = 50_000  # a test split of unset size (data.n_test: all) counted as ImageNet's validation set


def users_images(cfg: RunConfig) -> int:
    """Every user's images: each is marked, and scored by the audit."""
    return (cfg.plan.n_member_users + cfg.plan.n_nonmember_users) * cfg.plan.samples_per_user


def stored_side(cfg: RunConfig) -> int:
    """The side images are stored at, and so marked and written at."""
    return cfg.data.max_resolution or cfg.data.image_size


def written_images(cfg: RunConfig) -> int:
    """The write stage's images: the training set once, the members' marked records, the audit set
    and the test split."""
    members = cfg.plan.n_member_users * cfg.plan.samples_per_user
    return cfg.data.n_train + members + users_images(cfg) + (cfg.data.n_test or TEST_IMAGES_UNKNOWN)


def train_sizes(cfg: RunConfig) -> list[int]:
    """The crop size of every epoch: progressive resizing, a fixed crop, or the stored grid."""
    t = cfg.train
    if t.min_resolution is not None:
        return [t.resolution_at(epoch) for epoch in range(t.epochs)]
    return [t.resolution or cfg.data.image_size] * t.epochs


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "plan",
            config=("seed", "data", "plan"),
            reads={},
            writes=("users.json", "train_ids.npz"),
            run="plan:run_plan",
            check="plan:check_plan",
        ),
        StageSpec(
            "mark",
            config=("data", "mark"),
            reads={"users": Read("plan", "users.json")},
            writes=(
                *SHARD_FILES,
                "shard-*-of-*.pixels",
                "quality.json",
                "survival.json",
                "marked_examples.png",
                "owners/*",
            ),
            run="mark:run_mark",
            shards="launch.mark_shards",
            loop=Loop(lambda cfg: [(users_images(cfg), stored_side(cfg))], "mark", device="mark.device"),
        ),
        StageSpec(
            "write",
            config=("seed", "data", "mark", "write"),
            reads={
                "users": Read("plan", "users.json"),
                "train_ids": Read("plan", "train_ids.npz"),
                "marks": Read("mark", MANIFEST),
            },
            writes=("train.beton", "arms.npz", "test.beton", "audit.beton", "survival.json"),
            run="write:run_write",
            loop=Loop(
                lambda cfg: [(written_images(cfg), stored_side(cfg))],
                "write",
                runs_on="cpu",
                workers="write.num_workers",
            ),
        ),
        StageSpec(
            "train",
            config=("seed", "train"),
            reads={
                "train_set": Read("write", "train.beton"),
                "arms": Read("write", "arms.npz"),
                "test_set": Read("write", "test.beton"),
                "written": Read("write", MANIFEST),
            },
            writes=("model.pt", "metrics.json", "outliers.json", "checkpoints/*", "logs/*", "seen/*", "wandb/*"),
            run="train:run_train",
            arms=True,
            unhashed=("train.arms",),
            files=("train.init_weights",),
            lightning=Lightning(devices="train.devices", nodes="train.num_nodes", epochs="train.epochs"),
            loop=Loop(
                lambda cfg: [(cfg.data.n_train, size) for size in train_sizes(cfg)],
                "train",
                runs_on="gpu",
                device="train.accelerator",
                model="train.arch",
            ),
        ),
        StageSpec(
            "audit",
            config=("audit",),
            reads={
                "users": Read("plan", "users.json"),
                "audit_set": Read("write", "audit.beton"),
                "model": Read("train", "model.pt", arm="same"),
            },
            writes=(*SHARD_FILES, "losses.npz", "users.npz", "metrics.json"),
            run="audit:run_audit",
            arms=True,
            shards="launch.audit_shards",
            task_per_gpu=True,
            loop=Loop(
                lambda cfg: [(users_images(cfg), cfg.data.image_size)], "audit", runs_on="gpu", model="train.arch"
            ),
        ),
        StageSpec(
            "report",
            config=("name", "results_dir"),
            reads={
                "users": Read("plan", "users.json"),
                "planned": Read("plan", MANIFEST),
                "marks": Read("mark", MANIFEST),
                "survival": Read("mark", "survival.json"),
                "examples": Read("mark", "marked_examples.png"),
                "written": Read("write", MANIFEST),
                "stored_survival": Read("write", "survival.json"),
                "training": Read("train", "metrics.json", arm="all"),
                "trained": Read("train", MANIFEST, arm="all"),
                "audit": Read("audit", "metrics.json", arm="all"),
                "losses": Read("audit", "losses.npz", arm="all"),
                "per_user": Read("audit", "users.npz", arm="all"),
                "audited": Read("audit", MANIFEST, arm="all"),
            },
            writes=REPORT_FILES,
            run="report:run_report",
        ),
    )
}


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
        return stage_folder(self.stage, self.arm)

    @property
    def spec(self) -> StageSpec:
        return STAGES[self.stage]


def stage_folder(stage: str, arm: str | None = None) -> str:
    """The folder of a stage (of one arm) under the run directory."""
    return f"{stage}-{arm}" if arm else stage


def tasks(cfg: RunConfig) -> list[Task]:
    """All tasks in a valid execution order (the order of STAGES; arms in the config's order)."""
    return [Task(spec.name, arm) for spec in STAGES.values() for arm in (cfg.train.arms if spec.arms else (None,))]


def _read_arms(read: Read, task: Task, cfg: RunConfig) -> tuple[str | None, ...]:
    """The arms of `read.stage` that `task` reads (None for stages without arms)."""
    if not STAGES[read.stage].arms:
        return (None,)
    if read.arm == "same":
        return (task.arm,)
    return tuple(cfg.train.arms) if read.arm == "all" else (read.arm,)


def dependencies(cfg: RunConfig, task: Task) -> list[Task]:
    """Every stage whose files this task reads: each must be finished, with its files as recorded."""
    found: dict[str, Task] = {}
    for read in task.spec.reads.values():
        for arm in _read_arms(read, task, cfg):
            dep = Task(read.stage, arm)
            found.setdefault(dep.name, dep)
    return list(found.values())


def _declared_values(cfg: RunConfig, spec: StageSpec) -> dict[str, Any]:
    """The declared config keys' values, leaving out those at their default (a new option whose
    default keeps the old behaviour does not invalidate finished runs) and the unhashed ones."""
    values: dict[str, Any] = {}
    for key in spec.config:
        value = getattr(cfg, key)
        if hasattr(value, "model_dump"):
            skip = {dotted.split(".", 1)[1] for dotted in spec.unhashed if dotted.startswith(f"{key}.")}
            values[key] = value.model_dump(mode="json", exclude_defaults=True, exclude=skip)
        elif value != RunConfig.model_fields[key].default:
            values[key] = value
    return values


@functools.lru_cache(maxsize=16)
def _content_digest(path: str, mtime_ns: int, size: int) -> str:
    """A file's SHA-256, read once per version of the file (hashes are computed many times a run)."""
    return file_sha256(path)


def _file_digests(cfg: RunConfig, spec: StageSpec) -> dict[str, str]:
    """The content digest of each external file the stage declares and the config names (a missing
    file is the pre-flight check's to refuse)."""
    digests = {}
    for key in spec.files:
        value = setting(cfg, key)
        if value is not None and Path(value).is_file():
            stat = Path(value).stat()
            digests[key] = _content_digest(str(Path(value).resolve()), stat.st_mtime_ns, stat.st_size)
    return digests


def config_hash(cfg: RunConfig, task: Task) -> str:
    """What a task's outputs depend on: its declared config, its arm, the content of the external
    files it reads, and the hashes of the tasks it reads (Merkle-style, so an upstream change
    reaches it and an unrelated one does not)."""
    payload: dict[str, Any] = {
        "stage": task.stage,
        "arm": task.arm,
        "config": _declared_values(cfg, task.spec),
        "inputs": {dep.name: config_hash(cfg, dep) for dep in dependencies(cfg, task)},
    }
    if files := _file_digests(cfg, task.spec):  # only when set: hashes of runs without any stay as they were
        payload["files"] = files
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stage_for(cfg: RunConfig, task: Task) -> Stage:
    return Stage(Path(cfg.run_dir), task.name, config_hash(cfg, task))


def output_path(cfg: RunConfig, stage: str, file: str, arm: str | None = None) -> Path:
    """A declared output of a stage in this run's directory (the report's also lie in results_dir)."""
    if not STAGES[stage].declares(file):
        raise StageError(f"stage '{stage}' does not write {file}")
    return Path(cfg.run_dir) / stage_folder(stage, arm) / file


class ConfigView:
    """The run config as a stage sees it: only the keys its contract declares. Reading another one
    is a bug in the stage (its hash would miss a setting it depends on), so it fails loudly."""

    def __init__(self, cfg: RunConfig, spec: StageSpec) -> None:
        self._cfg, self._spec = cfg, spec

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key not in self._spec.config:
            raise StageError(
                f"stage '{self._spec.name}' reads config '{key}' without declaring it in its contract "
                f"(it declares {', '.join(self._spec.config)})"
            )
        return getattr(self._cfg, key)


@dataclass(frozen=True)
class Context:
    """Everything a stage runs with: its declared config (typed as the run config, but only the
    declared keys can be read), its inputs' paths, its output folder, and its arm and shard.
    `tracking` and `experiment` name the W&B run: logging only, in no hash; `settings` is what the
    outputs depend on (`depends_on`), which the W&B run records."""

    config: RunConfig
    stage: Stage
    task: Task
    inputs: dict[str, Path | dict[str, Path]] = field(default_factory=dict)
    tracking: WandbConfig = WandbConfig()
    experiment: str = "run"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def arm(self) -> str:
        if self.task.arm is None:
            raise StageError(f"stage '{self.task.stage}' has no arms")
        return self.task.arm

    def input(self, name: str) -> Path:
        path = self.inputs[name]
        if isinstance(path, dict):
            raise StageError(f"input '{name}' of stage '{self.task.stage}' is one file per arm; use inputs_by_arm")
        return path

    def inputs_by_arm(self, name: str) -> dict[str, Path]:
        paths = self.inputs[name]
        if not isinstance(paths, dict):
            raise StageError(f"input '{name}' of stage '{self.task.stage}' is a single file")
        return paths

    def manifest(self, name: str) -> dict[str, Any]:
        """An upstream stage's manifest, read through a declared input."""
        return read_json(self.input(name))


def depends_on(cfg: RunConfig, task: Task) -> dict[str, Any]:
    """The config a task's outputs depend on, as plain values: the sections it declares and those of
    every stage it reads, recursively (what its hash covers, defaults included)."""
    keys = set(task.spec.config)
    for dep in dependencies(cfg, task):
        keys |= set(depends_on(cfg, dep))
    values = {key: getattr(cfg, key) for key in sorted(keys)}
    return {key: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for key, v in values.items()}


def context(cfg: RunConfig, task: Task) -> Context:
    """The context `task` runs with, its inputs resolved to paths in this run."""
    inputs: dict[str, Path | dict[str, Path]] = {}
    for name, read in task.spec.reads.items():
        arms = _read_arms(read, task, cfg)
        paths = {arm: output_path(cfg, read.stage, read.file_for(task.arm), arm) for arm in arms}
        inputs[name] = cast(dict[str, Path], paths) if read.arm == "all" else paths[arms[0]]
    view = cast(RunConfig, ConfigView(cfg, task.spec))
    return Context(view, stage_for(cfg, task), task, inputs, cfg.wandb, cfg.name, depends_on(cfg, task))
