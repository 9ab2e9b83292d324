"""Typed, strictly validated run configuration.

One YAML file describes a whole run; each stage reads only its own section. Unknown or misspelt
keys, wrong types and out-of-range values are rejected with a one-line error naming the file and
the key, before any stage touches the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .store import parse_yaml, yaml_problem

MAX_SEED = 2**63 - 1  # seeds are 63-bit throughout (numpy's SeedSequence refuses negative ones)
MAX_PATTERNS, MAX_DRAWS = 1000, 9999  # an owner's audit marks and scores K images per candidate
MAX_SHARDS = 10_000  # array tasks a sharded stage may be split into


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the file and key."""


def _mentions(annotation: Any, kinds: tuple[type, ...]) -> bool:
    return annotation in kinds or any(_mentions(arg, kinds) for arg in get_args(annotation))


def _bool_in(value: Any) -> bool | None:
    """The first true/false in a value or its list, else None."""
    if isinstance(value, bool):
        return value
    return next((v for v in value if isinstance(v, bool)), None) if isinstance(value, list | tuple) else None


class StrictModel(BaseModel):
    """Unknown keys, NaN and infinity refused, and YAML's true/false kept apart from numbers: pydantic
    would read `audit.fdr_nonmembers: true` as 1 and `wandb.enabled: 1` as true."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[str(info.field_name)].annotation
        if annotation is bool and not isinstance(value, bool):
            raise ValueError(f"should be true or false, found {_kind_of(value)}")
        found = _bool_in(value)
        if found is not None and _mentions(annotation, (int, float)) and not _mentions(annotation, (bool, Any)):
            raise ValueError(f"should be a number, found {_kind_of(found)}")
        return value


class DataConfig(StrictModel):
    """Where images come from and the pixel grid they are stored (and marked) on."""

    source: Literal["fashion_mnist", "synthetic", "cifar10", "cifar100", "imagefolder"] = "fashion_mnist"
    root: str | None = None  # dataset folder (IDX files, CIFAR archive, train/+val/ folders); None: usual places
    download: bool = False  # fetch from the official location when the files are missing
    image_size: int = Field(32, ge=8, le=1024)  # images are padded/resized to this square grid
    n_train: int = Field(10_000, ge=10)  # training subset drawn from the train split
    n_test: int | None = Field(None, ge=1)  # cap on the test split (None = all)
    # Keep only these classes (names or indices), relabelled 0..n-1 in the source's order; empty: all.
    classes: tuple[str | int, ...] = ()
    synthetic_per_class: int = Field(1_200, ge=10)  # synthetic source: train images per class
    synthetic_classes: int = Field(10, ge=2, le=100)
    # How the write stage stores every image: a marked image exactly as the clean one it replaces
    # (same size, same JPEG-or-raw draw for its sample id, same quality); the name is historical.
    clean_write_mode: Literal["raw", "jpg", "proportion"] = "raw"  # proportion: JPEG for a seeded share
    jpeg_quality: int = Field(90, ge=1, le=100)
    compress_probability: float = Field(0.5, ge=0.0, le=1.0)  # proportion: share of images stored as JPEG
    # Images at their own size (image folders: from the file), longer side shrunk to this; the mark
    # stage marks them at that size. None: every image on the image_size grid.
    max_resolution: int | None = Field(None, ge=8)


class OwnersConfig(StrictModel):
    """Data owners who mark a folder with their own tool (`mtrack owner mark`, its key) instead of
    being marked by the mark stage: each member user becomes an owner holding `images` images of
    their class, whose published ones (samples_per_user of them) are in the training set;
    `never_trained` more owners publish images no model trains on. `bench/owner_audit.py` then runs
    `mtrack owner audit` for every owner."""

    images: int = Field(100, ge=2)  # P: the owner's folder of originals
    never_trained: int = Field(100, ge=0)
    design: Literal["subset", "groups", "pattern"] = "subset"
    draws: int = Field(999, ge=1, le=MAX_DRAWS)  # subset design: random subsets each audit compares with
    n_patterns: int = Field(100, ge=2, le=MAX_PATTERNS)  # pattern design: secret candidate patterns


class PlanConfig(StrictModel):
    """Who the users are: members mark training images, non-members mark held-out ones."""

    n_member_users: int = Field(10, ge=1)
    n_nonmember_users: int = Field(200, ge=1)
    samples_per_user: int = Field(10, ge=1)
    # Classes member users are drawn from, in turn (single-target runs: one user, one class);
    # empty: spread over all classes.
    member_classes: tuple[int, ...] = ()
    owners: OwnersConfig | None = None  # members are data owners using their own tool (owner-audit benchmark)

    @model_validator(mode="after")
    def _owners_publish(self) -> PlanConfig:
        o = self.owners
        if o is not None and (o.images == self.samples_per_user) != (o.design == "pattern"):
            raise ValueError(
                "plan.owners: the pattern design publishes all plan.owners.images, the others fewer: "
                "samples_per_user must equal images exactly for design 'pattern'"
            )
        return self


class MarkConfig(StrictModel):
    """The two-step mark: sign noise of amplitude epsilon, then a blend with the user's pattern."""

    noise: Literal["perlin", "uniform", "none"] = "perlin"
    epsilon: float = Field(8 / 255, ge=0.0, le=1.0)
    pattern: Literal["stripes", "ood_image"] = "stripes"
    alpha: float = Field(0.7, gt=0.0, le=1.0)
    n_stripes: int = Field(16, ge=1, le=256)
    ood_folder: str | None = None  # ood_image: draw each user's pattern from the images in this folder
    ood_dataset: Literal["fashion_mnist", "synthetic"] | None = None  # ... or from this source's test split
    device: Literal["auto", "numpy", "cpu", "cuda"] = "auto"  # auto: torch on CUDA when present, else numpy
    examples_users: int = Field(6, ge=1)  # users shown in the originals-vs-marked grid

    @model_validator(mode="after")
    def _ood_source(self) -> MarkConfig:
        sources = [s for s in (self.ood_folder, self.ood_dataset) if s is not None]
        if self.pattern == "ood_image" and len(sources) != 1:
            raise ValueError("pattern 'ood_image' needs exactly one of mark.ood_folder or mark.ood_dataset")
        if self.pattern != "ood_image" and sources:
            raise ValueError("mark.ood_folder / mark.ood_dataset are only used with pattern 'ood_image'")
        return self


class WriteConfig(StrictModel):
    """How the write stage runs (what it stores is set under `data`)."""

    num_workers: int = Field(2, ge=1)  # FFCV writer processes


class RandAugmentConfig(StrictModel):
    """torchvision's RandAugment on the training batches, drawn for every image or once per batch."""

    num_ops: int = Field(2, ge=1)
    magnitude: int = Field(9, ge=0, le=30)
    per: Literal["sample", "batch"] = "sample"


class DPConfig(StrictModel):
    """DP-SGD through Opacus: per-sample gradients clipped to max_grad_norm, Gaussian noise of
    noise_multiplier x max_grad_norm; the epsilon spent at `delta` is reported with the metrics."""

    noise_multiplier: float = Field(1.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)


class DefenseConfig(StrictModel):
    """Countermeasures a model trainer could apply against the audit; all off by default.
    (Label smoothing is `train.label_smoothing`.)"""

    jpeg_quality: int | None = Field(None, ge=1, le=100)  # every training image JPEG re-encoded at this quality
    randaugment: RandAugmentConfig | None = None
    mix: Literal["mixup", "cutmix"] | None = None  # per-batch MixUp/CutMix with soft labels
    mix_alpha: float = Field(1.0, gt=0.0)  # Beta(alpha, alpha) mixing coefficient
    early_stopping_patience: int | None = Field(None, ge=1)  # validations without a better val_acc before stopping
    outlier_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # share of each class dropped as outliers before training
    prune_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # smallest-magnitude weights zeroed (global, conv + linear)
    finetune_epochs: int = Field(0, ge=0)  # the pruned model is fine-tuned for the last this-many epochs
    dp: DPConfig | None = None

    @model_validator(mode="after")
    def _pruning(self) -> DefenseConfig:
        if self.finetune_epochs and not self.prune_fraction:
            raise ValueError("train.defense.finetune_epochs fine-tunes after pruning; set prune_fraction")
        return self


class TrainConfig(StrictModel):
    """Training recipe. `arms` lists the models to train: the marked one and the unmarked control."""

    arch: str = "small_cnn"
    init_weights: str | None = None  # state_dict or model.pt to fine-tune from (matching tensors; the head is new)
    # What fine-tuning trains: every layer, or only the last linear layer on a frozen backbone
    # (its BatchNorm statistics frozen too: a linear probe).
    finetune: Literal["full", "head"] = "full"
    width: int = Field(32, ge=4)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)  # evaluation and the outlier filter's scan (no gradients)
    lr: float = Field(0.05, gt=0.0)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw uses momentum as its beta1
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    schedule: Literal["onecycle", "cosine", "linear", "multistep", "constant"] = "onecycle"
    warmup_epochs: float = Field(0.0, ge=0.0)  # linear ramp from 0 (not used by onecycle, which has its own)
    milestones: tuple[int, ...] = ()  # multistep: epochs at which the rate is multiplied by gamma
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    augment: Literal["flip_translate", "flip", "none"] = "flip_translate"
    translate_pixels: int = Field(2, ge=0)
    # Random-resized-crop training at this size and centre-crop evaluation (ratio 224/256) at
    # eval_resolution, for images of varying size (data.max_resolution); None trains on stored pixels.
    resolution: int | None = Field(None, ge=8)
    eval_resolution: int | None = Field(None, ge=8)  # None: same as resolution
    # Progressive resizing (FFCV's ImageNet recipe): training crops grow linearly from min_resolution
    # to `resolution` between the two epochs of resize_epochs, in steps of 32 px.
    min_resolution: int | None = Field(None, ge=8)
    resize_epochs: tuple[int, int] = (0, 0)
    test_time_flip: bool = False  # test accuracy from the mean logits of each image and its mirror image
    loader: Literal["ffcv", "torch"] = "ffcv"  # torch: plain DataLoader over the same .beton files
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp"] = "auto"
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed"] = "auto"
    channels_last: bool = True  # NHWC memory layout: faster convolutions on GPUs and on CPUs with AMX
    num_workers: int = Field(2, ge=1)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads on CPU (None = torch default)
    arms: tuple[Literal["marked", "control"], ...] = ("marked", "control")
    checkpoint_every_n_steps: int = Field(500, ge=1)
    record_samples: bool = False  # save the sample and user ids each rank trained on, per epoch (seen/ in the stage)
    defense: DefenseConfig = DefenseConfig()

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if self.schedule == "multistep" and (not self.milestones or list(self.milestones) != sorted(self.milestones)):
            raise ValueError("schedule 'multistep' needs train.milestones: epochs in increasing order")
        if self.schedule == "onecycle" and self.warmup_epochs:
            raise ValueError("schedule 'onecycle' has its own warm-up; set train.warmup_epochs to 0")
        if self.min_resolution is not None and (self.resolution is None or self.min_resolution > self.resolution):
            raise ValueError("train.min_resolution needs train.resolution at least as large")
        if self.resize_epochs[0] > self.resize_epochs[1]:
            raise ValueError("train.resize_epochs: the first epoch must not come after the second")
        if self.finetune == "head" and self.init_weights is None:
            raise ValueError(
                "train.finetune 'head' trains the last layer of a pretrained network; set train.init_weights"
            )
        if self.defense.finetune_epochs >= self.epochs:
            raise ValueError("train.defense.finetune_epochs must be fewer than train.epochs")
        if self.defense.dp is not None and (self.devices != 1 or self.num_nodes != 1):
            # DDP would average raw gradients that DP-SGD then overwrites with each rank's own noisy ones
            raise ValueError("train.defense.dp trains on one device: set train.devices 1 and train.num_nodes 1")
        return self

    def resolution_at(self, epoch: int) -> int:
        """Training crop size at `epoch` under progressive resizing, as FFCV's ImageNet recipe computes
        it (`get_resolution` in ffcv-imagenet): min_resolution up to the first of resize_epochs,
        `resolution` from the second on, and in between the linear interpolation rounded to the
        nearest multiple of 32 (half to even, as numpy rounds)."""
        low, high = self.min_resolution, self.resolution
        if low is None or high is None:
            raise ValueError("train.resolution_at needs train.min_resolution and train.resolution")
        start, end = self.resize_epochs
        if epoch <= start:
            return low
        if epoch >= end:
            return high
        return round((low + (epoch - start) / (end - start) * (high - low)) / 32) * 32


class AuditConfig(StrictModel):
    batch_size: int = Field(512, ge=1)
    num_workers: int = Field(2, ge=1)
    # Never-trained-on users tested next to the members in the Benjamini-Hochberg decisions (the
    # first ones in the plan), so the decisions show false discoveries; the rest only serve as null.
    fdr_nonmembers: int = Field(100, ge=0)


class WandbConfig(StrictModel):
    """Weights & Biases logging through Lightning's logger: off unless enabled, offline unless told
    otherwise (upload later with `wandb sync <run_dir>/train-*/wandb/offline-run-*`)."""

    enabled: bool = False
    project: str = "membership-audit"
    mode: Literal["offline", "online"] = "offline"
    group: str | None = None  # the runs' W&B group (None: the run's name); experiment tables: the table
    # Recorded in every run's config and name, to filter and group by (experiment tables: table, row, seed)
    labels: dict[str, str | int] = {}


class Resources(StrictModel):
    """What one SLURM job of a stage asks for (per task; train's tasks and nodes follow train.devices
    and train.num_nodes, its GPUs per node must equal its devices)."""

    cpus_per_task: int = Field(2, ge=1)
    mem_gb: float = Field(8, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    time_min: int = Field(60, ge=1)


class SlurmConfig(StrictModel):
    """Where and how SLURM runs the stages; used only by `run --launcher slurm`."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    log_dir: str | None = None  # submitit's job folders (None: <run_dir>/slurm)
    array_parallelism: int = Field(64, ge=1)  # array tasks running at once
    max_requeues: int = Field(3, ge=0)  # preemptions/time-outs survived before a job gives up
    signal_delay_s: int = Field(120, ge=1)  # USR2 this long before the time limit: checkpoint and requeue
    setup: tuple[str, ...] = ()  # shell lines run before each job (module load ..., source ...)
    poll_s: float = Field(10, gt=0)  # how often a followed run asks squeue/sacct for its jobs' states
    summary_every_s: float = Field(300, gt=0)  # a one-line summary when nothing changed for this long
    default: Resources = Resources()
    # Per-stage overrides of `default`, by the stage names of pipeline.stages.contract.STAGES (checked
    # by `mtrack run`: this module sits below the stages and cannot import them).
    stages: dict[str, Resources] = {}

    def resources(self, stage: str) -> Resources:
        return self.stages.get(stage, self.default)


class LaunchConfig(StrictModel):
    """How a run is split into jobs. Not part of any stage's hash: the outputs do not depend on it."""

    mark_shards: int = Field(1, ge=1, le=MAX_SHARDS)  # users split over this many array tasks
    audit_shards: int = Field(1, ge=1, le=MAX_SHARDS)
    slurm: SlurmConfig = SlurmConfig()


class RunConfig(StrictModel):
    """A whole run: where it lives, its seed, and one section per stage."""

    name: str = "run"
    run_dir: str = "runs/run"
    results_dir: str = "results/run"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    data: DataConfig = DataConfig()
    plan: PlanConfig = PlanConfig()
    mark: MarkConfig = MarkConfig()
    write: WriteConfig = WriteConfig()
    train: TrainConfig = TrainConfig()
    audit: AuditConfig = AuditConfig()
    wandb: WandbConfig = WandbConfig()  # logging only: not part of any stage's config hash
    launch: LaunchConfig = LaunchConfig()  # where stages run: not part of any stage's config hash

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.data.max_resolution is not None and self.train.resolution is None:
            raise ValueError(
                "data.max_resolution stores images at their own size: set train.resolution "
                "(random-resized-crop training) so batches have one size"
            )
        k, n = self.plan.samples_per_user, self.plan.n_member_users
        if k * n > self.data.n_train:
            raise ValueError(
                f"plan.n_member_users * plan.samples_per_user = {k * n} exceeds data.n_train = {self.data.n_train}"
            )
        return self


# pydantic's wording, for a type, in the user's words (the model's class name must not show)
_SHOULD_BE = {
    "model_type": "a section of key: value settings",
    "model_attributes_type": "a section of key: value settings",
    "dict_type": "a mapping of key: value pairs",
    "tuple_type": "a list",
    "list_type": "a list",
}


def validation_problem(exc: ValidationError) -> str:
    """The first problem pydantic found, as `key.path: what is wrong` in the user's words."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {problem_text(err)}" if where else problem_text(err)


def problem_text(err: Any) -> str:
    """What one pydantic error says is wrong, without its internals: no class names ("instance of
    OwnersConfig"), no "Value error," prefix."""
    kind = err["type"]
    if kind in _SHOULD_BE:
        return f"should be {_SHOULD_BE[kind]}, found {_kind_of(err['input'])}"
    if kind == "missing":
        return "missing"
    if kind == "extra_forbidden":
        return "not a known key (misspelt, or in the wrong section?)"
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{message}, found {_kind_of(err['input'])}" if kind.endswith(("_type", "_parsing")) else message


def _kind_of(value: Any) -> str:
    """A YAML or JSON value as its author would call it: null, true, 3, 'text', a list, a mapping."""
    if value is None or isinstance(value, bool):
        return str(value).lower().replace("none", "null")
    if isinstance(value, int | float | str):
        return f"{value!r:.40}"
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list | tuple) else "a value"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
    node[leaf] = value


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file (`what`: "config file", "experiment table") as Python values: every way a file can
    fail to be sane YAML (a folder, a device, not UTF-8, unreadable, broken, nested or numbered
    beyond the parser's bounds) is refused in one line naming the file."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not {_a(what)}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: not a regular file (a device, pipe or socket), not {_a(what)}")
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text (UTF-8) file: byte {exc.start} is 0x{exc.object[exc.start]:02x}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_problem(exc)}") from None


def _a(what: str) -> str:
    return f"{'an' if what[0] in 'aeiou' else 'a'} {what}"


def read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict; `extends: other.yaml` (relative to the file) starts from that config,
    so a recipe states only where it differs from the one it builds on."""
    tree = read_yaml(path, "config file")
    if tree is None:  # an empty file: every setting at its default
        tree = {}
    if not isinstance(tree, dict):  # "0" or "[]" is not an empty config
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(tree).__name__} {tree!r:.40}")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    base_path = (path.parent / str(parent)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: extends: {parent} leads back to itself")
    return _merged(read_tree(base_path, (*seen, path.resolve())), tree)


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value` as (dotted key, YAML value); a malformed one is refused naming it."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {item}: expected section.key=value")
    try:
        return key, parse_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: {yaml_problem(exc).replace(' at line 1,', ' at')}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config; `overrides` are `section.key=value` strings parsed as YAML values."""
    path = Path(path)
    tree = read_tree(path)
    for item in overrides or []:
        _set_dotted(tree, *parse_override(item))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_problem(exc)}") from None
