"""What a SLURM run will cost before it is submitted: per job, the expected wall time and GPU-hours
at the resources `launch.slurm` asks for.

Estimates come from throughputs, each named with its source: measured ones in `results/bench/`
(`gpu.json` from `make gpu-check` on a CUDA machine; `scale.json` from `make scale`, the whole mark
and write stages per CPU core on ImageNet-shaped images; `marking.json` from `make bench`) and, for
ResNet-50 training without a GPU measurement, FFCV's published figure. A job with no source says
so instead of guessing. Estimates cover the images each stage pushes through its main loop, as its
entry in `STAGES` declares it (`Loop`: marking, writing, training steps, scoring), not start-up,
validation or reports, and assume every array task of a job runs at once (up to
`launch.slurm.array_parallelism`) and training scales linearly over its GPUs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..config import RunConfig
from ..stages.contract import setting
from ..store import StageError, read_json
from .jobs import Job
from .slurm import slurm_parameters

BENCH_DIR = Path(__file__).resolve().parents[2] / "results" / "bench"
CPU_UNITS = ("core", "worker")  # rates of CPU processes; any other unit drives a device (a GPU)
CPU_DEVICES = ("cpu", "numpy")  # values of a stage's device key that keep it off its job's GPUs
KERNEL_ONLY = " (mark_batch only: not decoding, PSNR/SSIM)"  # what a marking-kernel rate leaves out
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
    """Images per second of one unit (a GPU, a CPU core, a writer worker) by image side, for
    training and scoring the model they were measured with, and what of the loop they leave out."""

    images_per_s: dict[int, float]
    unit: str
    source: str
    arch: str | None = None
    scope: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.unit not in CPU_UNITS

    def at(self, size: int) -> float:
        """At `size` px: the nearest measured size, scaled by pixel count."""
        measured = min(self.images_per_s, key=lambda s: (abs(s - size), s))
        return self.images_per_s[measured] * (measured / size) ** 2


@dataclass(frozen=True)
class Rates:
    """Every throughput the estimates can use, by its name (a stage's `Loop.throughput`), best first."""

    by_name: dict[str, tuple[Rate, ...]]

    def find(self, name: str, on_gpu: bool, model: str | None) -> Rate | None:
        """The best rate of `name` on GPUs or on CPUs; for `model` when one is named."""
        candidates = self.by_name.get(name, ())
        return next((r for r in candidates if r.on_gpu == on_gpu and model in (None, r.arch)), None)


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
            KERNEL_ONLY if key == "mark" else "",  # the check times mark_batch alone
        )
        for key, entry in report.get("throughput", {}).items()
    }


def _cpu_marking(path: Path) -> dict[str, Rate]:
    report = read_json(path)
    rates = {
        int(m[1]): float(row["ours"])
        for row in report["rows"]
        if (m := re.fullmatch(r"mark (\d+)x\1 perlin, 1 core", row["case"]))
    }
    where = f"measured: {path.name} on {report['machine'].split(',')[0]}"
    return {"mark": Rate(rates, "core", where, scope=KERNEL_ONLY)} if rates else {}


def _scale_rates(path: Path) -> dict[str, Rate]:
    """CPU rates of the rehearsal at its largest size (`make scale`): images through a sharded stage
    per CPU-second of its shard jobs (its merge is a fixed cost, not a rate), of its one job
    otherwise, at the stored size (the recipe's longer side)."""
    report = read_json(path)
    largest = max(s["n_images"] for s in report["stages"])
    side = max(size["config"]["max_resolution"] or 0 for size in report["sizes"].values()) or 256
    machine = report["machine"].split(",")[0]
    where = f"measured: {path.name}, the rehearsal on {largest:,} ImageNet-shaped images on {machine}"
    return {
        stage["stage"]: Rate(
            {side: float(stage["images_per_s_per_core"])},
            "core",
            f"{where} (decode, mark or encode, write)",
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
    """Every source of each throughput, best first: a GPU measurement (its writer workers too), the
    whole-stage CPU rates of `make scale`, the marking kernel on one core, FFCV's published figure."""
    found: dict[str, list[Rate]] = {}
    for rates in (
        _read(bench_dir / "gpu.json", _gpu_rates, {}),
        _read(bench_dir / "scale.json", _scale_rates, {}),
        _read(bench_dir / "marking.json", _cpu_marking, {}),
        {"train": _published_train()},
    ):
        for name, rate in rates.items():
            found.setdefault(name, []).append(rate)
    return Rates({name: tuple(rates) for name, rates in found.items()})


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


def estimate_job(cfg: RunConfig, job: Job, rates: Rates) -> Estimate:
    """Expected wall time and GPUs of one job of the plan: the images its stage's loop pushes
    through, split over the job's array tasks, at the throughput of the units each task runs."""
    p, loop, name = slurm_parameters(cfg, job.task), job.task.spec.loop, job.task.name
    limit = p["timeout_min"]
    array_tasks = len(job.shards) if job.task.num_shards > 1 else 1  # no shards left: the job only merges
    gpus = p["gpus_per_node"] * p["nodes"] * array_tasks
    if loop is None:
        return Estimate(name, 0, gpus, None, "not estimated (no image loop)", limit_min=limit)
    passes = [(n * array_tasks // job.task.num_shards, side) for n, side in loop.passes(cfg)]
    images = sum(n for n, _ in passes)
    if images == 0:
        return Estimate(name, 0, gpus, 0.0, "-", limit_min=limit)
    on_gpu = (
        loop.runs_on != "cpu"
        and p["gpus_per_node"] > 0
        and (loop.device is None or setting(cfg, loop.device) not in CPU_DEVICES)
    )
    if not on_gpu and loop.runs_on == "gpu":
        return Estimate(name, images, gpus, None, "not estimated on CPU", limit_min=limit)
    model = setting(cfg, loop.model) if loop.model is not None else None
    rate = rates.find(loop.throughput, on_gpu, model)
    if rate is None:
        where = "GPUs: run make gpu-check" if on_gpu else "CPUs: run make scale"
        return Estimate(
            name, images, gpus, None, f"no throughput{f' for {model}' if model else ''} on {where}", limit_min=limit
        )
    if on_gpu:  # each task drives one GPU
        units = p["tasks_per_node"] * p["nodes"]
    else:
        units = min(setting(cfg, loop.workers), p["cpus_per_task"]) if loop.workers is not None else 1
    waves = math.ceil(array_tasks / cfg.launch.slurm.array_parallelism)
    wall = waves * sum(n / array_tasks / (rate.at(side) * units) for n, side in passes)
    speeds = ", ".join(f"{rate.at(side):,.0f} at {side} px" for side in sorted({side for _, side in passes}))
    used = f"img/s per {rate.unit}: {speeds}" + (f"; x {units} {rate.unit}s" if units > 1 else "") + rate.scope
    return Estimate(name, images, gpus, wall, used, rate.source, limit)


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
