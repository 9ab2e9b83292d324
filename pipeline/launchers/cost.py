"""What a SLURM run will cost before it is submitted: per job, the expected wall time and GPU-hours
at the resources `launch.slurm` asks for.

Estimates come from throughputs, each named with its source: measured ones in `results/bench/`
(`gpu.json` from `make gpu-check` on a CUDA machine; `scale.json` from `make scale`, the whole mark
and write stages per CPU core on ImageNet-shaped images; `marking.json` from `make bench`) and, for
ResNet-50 training without a GPU measurement, FFCV's published figure. A job with no source says
so instead of guessing. Estimates cover the images each stage pushes through its main loop
(marking, writing, training steps, scoring), not start-up, validation or reports, and assume every
array task of a job runs at once (up to `launch.slurm.array_parallelism`) and training scales
linearly over its GPUs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..config import RunConfig
from ..store import StageError, read_json
from .jobs import Job
from .slurm import slurm_parameters

BENCH_DIR = Path(__file__).resolve().parents[2] / "results" / "bench"
TEST_IMAGES_UNKNOWN = 50_000  # a test split of unset size (data.n_test: all) counted as ImageNet's validation set
T = TypeVar("T")


@dataclass(frozen=True)
class PublishedRun:
    """A published training run: `epochs_at` maps each crop size to the epochs trained at it."""

    arch: str
    images_per_epoch: int
    epochs_at: dict[int, int]
    minutes: float
    gpus: int
    gpu: str
    where: str

    def images_per_s(self, size: int) -> float:
        """Per GPU at `size` px, with time per image taken as proportional to its pixels: the run's
        wall time spread over its epochs weighted by (resolution / size)^2. Validation time stays in
        the published wall time, so this slightly understates the training-step rate."""
        weighted_epochs = sum(n * (res / size) ** 2 for res, n in self.epochs_at.items())
        return self.images_per_epoch * weighted_epochs / (self.minutes * 60 * self.gpus)


# FFCV's ImageNet table (github.com/libffcv/ffcv-imagenet, README; rn50_configs/rn50_88_epochs.yaml):
# ResNet-50, 88 epochs of the 1,281,167 ImageNet-1k training images in 77.2 min on 8 x A100, batch
# 512 per GPU, fp16 autocast, channels_last. Crops are 160 px until the ramp (epochs 65-76, rounded
# to 32 px), 192 px after: 71 epochs at 160 px and 17 at 192 px. That is 3,042 img/s per A100 over
# the run and 3,301 img/s at 160 px.
FFCV_RN50 = PublishedRun(
    arch="resnet50",
    images_per_epoch=1_281_167,
    epochs_at={160: 71, 192: 17},
    minutes=77.2,
    gpus=8,
    gpu="A100",
    where="github.com/libffcv/ffcv-imagenet",
)


@dataclass(frozen=True)
class Rate:
    """Images per second of one unit (a GPU, a CPU core, a writer worker) by image side, and for
    training and scoring the model they were measured with."""

    images_per_s: dict[int, float]
    unit: str
    source: str
    arch: str | None = None

    def at(self, size: int) -> float:
        """At `size` px: the nearest measured size, scaled by pixel count."""
        measured = min(self.images_per_s, key=lambda s: (abs(s - size), s))
        return self.images_per_s[measured] * (measured / size) ** 2


@dataclass(frozen=True)
class Rates:
    """Every throughput the estimates can use; None where nothing is known."""

    train: Rate | None = None  # training steps, per GPU, measured
    published_train: Rate | None = None  # FFCV's ResNet-50 figure
    audit: Rate | None = None  # scoring, per GPU
    mark_gpu: Rate | None = None  # mark_batch on CUDA, per GPU
    mark_cpu: Rate | None = None  # mark_batch with numpy, per core (the mark stage is one process)
    write: Rate | None = None  # FFCV writer, per worker

    def for_arch(self, arch: str, *candidates: Rate | None) -> Rate | None:
        """The first of `candidates` measured or published for `arch`."""
        return next((rate for rate in candidates if rate is not None and rate.arch == arch), None)


def _published_train() -> Rate:
    run = FFCV_RN50
    return Rate(
        {160: run.images_per_s(160)},
        "GPU",
        f"published: FFCV ResNet-50, {sum(run.epochs_at.values())} epochs in {run.minutes} min on "
        f"{run.gpus} x {run.gpu} ({run.where}); other sizes scaled by pixel count",
        run.arch,
    )


def _gpu_rates(path: Path) -> dict[str, Rate]:
    """The throughputs `make gpu-check` measured on CUDA (a CPU run of it is never used)."""
    report = read_json(path)
    if report.get("device") != "cuda":
        return {}
    where = f"measured: {path.name} on {report.get('gpu', {}).get('name') or 'a GPU'}"
    return {
        key: Rate(
            {int(size): float(v) for size, v in entry["images_per_s"].items()},
            entry["per"],
            f"{where} ({entry['what']})",
            entry.get("arch"),
        )
        for key, entry in report.get("throughput", {}).items()
    }


def _cpu_marking(path: Path) -> Rate | None:
    report = read_json(path)
    rates = {
        int(m[1]): float(row["ours"])
        for row in report["rows"]
        if (m := re.fullmatch(r"mark (\d+)x\1 perlin, 1 core", row["case"]))
    }
    return Rate(rates, "core", f"measured: {path.name} on {report['machine'].split(',')[0]}") if rates else None


def _scale_rates(path: Path) -> dict[str, Rate]:
    """Whole-stage CPU rates of the rehearsal at its largest size (`make scale`): images through the
    stage per CPU-second of all its jobs, at the stored size (the recipe's longer side)."""
    report = read_json(path)
    largest = max(s["n_images"] for s in report["stages"])
    side = max(size["config"]["max_resolution"] or 0 for size in report["sizes"].values()) or 256
    machine = report["machine"].split(",")[0]
    where = f"measured: {path.name}, the rehearsal on {largest:,} ImageNet-shaped images on {machine}"
    return {
        stage["stage"]: Rate(
            {side: float(stage["images_per_s_per_core"])},
            "core",
            f"{where} (whole stage: decode, mark or encode, write)",
        )
        for stage in report["stages"]
        if stage["n_images"] == largest and stage["images_per_s_per_core"]
    }


def _read(path: Path, parse: Callable[[Path], T], empty: T) -> T:
    """A benchmark file parsed, `empty` when there is none; a file of another shape is named."""
    if not path.is_file():
        return empty
    try:
        return parse(path)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StageError(
            f"{path}: not a benchmark result the cost estimate can read ({type(exc).__name__}: {exc})"
        ) from None


def load_rates(bench_dir: Path = BENCH_DIR) -> Rates:
    """The best source for each throughput: a GPU measurement, else the CPU benchmark or FFCV's figure."""
    gpu: dict[str, Rate] = _read(bench_dir / "gpu.json", _gpu_rates, {})
    scale: dict[str, Rate] = _read(bench_dir / "scale.json", _scale_rates, {})
    mark_cpu = scale.get("mark") or _read(bench_dir / "marking.json", _cpu_marking, None)
    return Rates(
        train=gpu.get("train"),
        published_train=_published_train(),
        audit=gpu.get("audit"),
        mark_gpu=gpu.get("mark"),
        mark_cpu=mark_cpu,
        write=gpu.get("write") or scale.get("write"),
    )


@dataclass(frozen=True)
class Estimate:
    """One job's cost: `wall_s` None when no throughput is known (`used` then says what is missing)."""

    job: str
    images: int
    gpus: int  # GPUs the job holds, all its tasks together
    wall_s: float | None
    used: str
    source: str | None = None
    limit_min: int | None = None

    @property
    def gpu_hours(self) -> float | None:
        if self.gpus == 0:
            return 0.0
        return None if self.wall_s is None else self.wall_s * self.gpus / 3600


def _users_images(cfg: RunConfig) -> int:
    return (cfg.plan.n_member_users + cfg.plan.n_nonmember_users) * cfg.plan.samples_per_user


def _per_task(
    cfg: RunConfig,
    job: Job,
    images: int,
    rate: Rate | None,
    size: int,
    units: int,
    gpus_per_task: int,
    missing: str,
    scope: str = "",
) -> Estimate:
    """A job whose `images` are split evenly over its shards, each task running `units` units of `rate`."""
    p = slurm_parameters(cfg, job.task)
    tasks = len(job.shards) if job.task.num_shards > 1 else 1  # no shards left: the job only merges
    images = images * tasks // job.task.num_shards
    if rate is None or images == 0:
        return Estimate(
            job.task.name,
            images,
            gpus_per_task * tasks,
            None if images else 0.0,
            missing if images else "-",
            limit_min=p["timeout_min"],
        )
    per_task = images / tasks / (rate.at(size) * units)
    waves = math.ceil(tasks / cfg.launch.slurm.array_parallelism)
    used = f"{rate.at(size):,.0f} img/s per {rate.unit} at {size} px" + (f" x {units}" if units > 1 else "") + scope
    return Estimate(job.task.name, images, gpus_per_task * tasks, per_task * waves, used, rate.source, p["timeout_min"])


def estimate_job(cfg: RunConfig, job: Job, rates: Rates) -> Estimate:
    """Expected wall time and GPUs of one job of the plan."""
    p, stage, size = slurm_parameters(cfg, job.task), job.task.stage, cfg.data.image_size
    stored = cfg.data.max_resolution or size  # images are marked and written at their stored size
    gpus = p["gpus_per_node"] * p["nodes"]
    if stage == "mark":
        on_gpu = p["gpus_per_node"] > 0 and cfg.mark.device in ("auto", "cuda")
        rate = rates.mark_gpu if on_gpu else rates.mark_cpu
        scope = (
            "" if rate is not None and "whole stage" in rate.source else " (mark_batch only: not decoding, PSNR/SSIM)"
        )
        return _per_task(
            cfg,
            job,
            _users_images(cfg),
            rate,
            stored,
            1,
            p["gpus_per_node"],
            "not measured: run make gpu-check" if on_gpu else "not measured: run make scale",
            scope,
        )
    if stage == "write":  # the training set once, the members' marked records, the test split, the audit set
        members = cfg.plan.n_member_users * cfg.plan.samples_per_user
        images = cfg.data.n_train + members + _users_images(cfg) + (cfg.data.n_test or TEST_IMAGES_UNKNOWN)
        workers = min(cfg.write.num_workers, p["cpus_per_task"])
        return _per_task(cfg, job, images, rates.write, stored, workers, gpus, "not measured: run make scale")
    arch = cfg.train.arch
    if stage == "audit":
        if p["gpus_per_node"] == 0:
            return Estimate(
                job.task.name, _users_images(cfg), 0, None, "not measured on CPU", limit_min=p["timeout_min"]
            )
        return _per_task(
            cfg,
            job,
            _users_images(cfg),
            rates.for_arch(arch, rates.audit),
            size,
            p["gpus_per_node"],
            p["gpus_per_node"],
            f"not measured for {arch}: run make gpu-check",
        )
    if stage == "train":
        return _train(cfg, job, rates.for_arch(arch, rates.train, rates.published_train), gpus, p["timeout_min"])
    return Estimate(job.task.name, 0, gpus, None, "not estimated (no image loop)", limit_min=p["timeout_min"])


def train_sizes(cfg: RunConfig) -> list[int]:
    """The crop size of every epoch: progressive resizing, a fixed crop, or the stored grid."""
    t = cfg.train
    if t.min_resolution is not None:
        return [t.resolution_at(epoch) for epoch in range(t.epochs)]
    return [t.resolution or cfg.data.image_size] * t.epochs


def _train(cfg: RunConfig, job: Job, rate: Rate | None, gpus: int, limit_min: int) -> Estimate:
    """Training steps over every epoch: n_train images per epoch at that epoch's crop size."""
    images = cfg.train.epochs * cfg.data.n_train
    if gpus == 0:
        return Estimate(job.task.name, images, gpus, None, "no GPUs requested: not estimated", limit_min=limit_min)
    if rate is None:
        return Estimate(
            job.task.name,
            images,
            gpus,
            None,
            f"no throughput for {cfg.train.arch}: measured (make "
            "gpu-check) for the recipe's model, published for resnet50",
            limit_min=limit_min,
        )
    sizes = train_sizes(cfg)
    wall = sum(cfg.data.n_train / (rate.at(size) * gpus) for size in sizes)
    used = ", ".join(f"{rate.at(s):,.0f} at {s} px" for s in sorted(set(sizes)))
    return Estimate(
        job.task.name, images, gpus, wall, f"img/s per {rate.unit}: {used}; x {gpus} GPUs", rate.source, limit_min
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def cost_table(cfg: RunConfig, jobs: list[Job], bench_dir: Path = BENCH_DIR) -> str:
    """The estimate of every job in the plan as a table, its sources numbered below it."""
    if not jobs:
        return ""
    rates = load_rates(bench_dir)
    estimates = [estimate_job(cfg, job, rates) for job in jobs]
    sources = list(dict.fromkeys(e.source for e in estimates if e.source))
    rows = [("job", "images", "wall time", "GPUs", "GPU-hours", "throughput used")]
    for e in estimates:
        wall = _duration(e.wall_s) + (
            f" (over the {e.limit_min} min limit)" if e.wall_s and e.limit_min and e.wall_s > 60 * e.limit_min else ""
        )
        hours = "?" if e.gpu_hours is None else f"{e.gpu_hours:.1f}" if e.gpu_hours else "0"
        mark = f"[{sources.index(e.source) + 1}] " if e.source else ""
        rows.append((e.job, f"{e.images:,}" if e.images else "-", wall, str(e.gpus), hours, mark + e.used))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["cost estimate at these resources (main loops only: no start-up, validation or reports):"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    known = sum(e.gpu_hours or 0.0 for e in estimates)
    unknown = [e.job for e in estimates if e.gpu_hours is None]
    lines.append(f"total: {known:.1f} GPU-hours" + (f", plus {', '.join(unknown)} (no estimate)" if unknown else ""))
    lines += [f"[{i}] {source}" for i, source in enumerate(sources, 1)]
    return "\n".join(lines)
