"""GPU readiness check: one unattended command that proves the pipeline's CUDA paths and measures
them (`make gpu-check`, or `python -m bench.gpu_check` from the repository root).

Parts, in order, each in its own process under its own time box: a failure or time-out is recorded
with its error and the next part runs, and the JSON is rewritten after every part, so a killed run
keeps what it learned.
- prepare: a synthetic ImageNet-like folder of JPEGs, written by FFCV into a training beton the
  way configs/imagenet-rn50.yaml stores clean images (longer side at most 500 px, half of them JPEG
  q90), and an audit beton of raw images on the recipe's 256 px grid; the writer's rate is kept;
- mark: `mark_batch` on the device against the numpy path on every CPU core (a process pool), at
  224² and 32², one user's K images per call as the mark stage calls it;
- train: ResNet-50 training steps with the recipe's data path and settings (FFCV random-resized
  crops at 160 and 192 px + flip, bf16-mixed, channels_last, its batch size and workers) through
  the Lightning module (`Classifier`, `BetonData`) against a plain PyTorch loop over the same loader
  and model, and the Lightning rate next to FFCV's published ResNet-50 rate per A100;
- audit: `score_samples` against a bare forward loop, ResNet-50 over the audit beton;
- dag: `mtrack run configs/imagenet-rn50.yaml` on the synthetic folder, shortened by --set
  overrides: plan, mark on the device, write, train both arms, audit, report;
- ddp: Lightning DDP over every GPU (NCCL) against the one-GPU rate; skipped with one GPU.

On CUDA it writes results/bench/gpu.json (rows as every benchmark, plus the GPU, driver and CUDA
versions, each part's status and the throughputs `mtrack run --launcher slurm --dry-run` uses for
its cost estimate) and the `gpu.json` line of results/bench/README.md. `--device cpu --tiny` runs
the same parts at tiny sizes on CPU (the test suite does) and writes under its work folder only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS,
    comparison,
    cpu_model,
    interleaved_medians,
    machine,
    run_reporting_errors,
    update_bench_readme,
)

# Kept light on purpose: spawned marking workers import this module again, and the heavy imports
# (torch, Lightning, FFCV) live in the parts that need them.

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "imagenet-rn50.yaml"
GPU_JSON = RESULTS / "bench" / "gpu.json"
NUM_CLASSES, MEAN, STD = 1000, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's
FAILED, PASSED, SKIPPED = "failed", "passed", "skipped"


@dataclass(frozen=True)
class Scale:
    """How much each part does: `FULL` on a GPU within the 8-minute budget, `TINY` on CPU in the tests."""

    classes: int  # the synthetic JPEG folder: classes x per_class training images of jpeg_sizes
    per_class: int
    jpeg_sizes: tuple[tuple[int, int], ...]
    train_records: int  # records in the training beton (the folder's images, cycled)
    train_batch: int
    train_resolutions: tuple[int, ...]  # the first is compared with FFCV's figure and used for DDP
    warm_batches: int  # batches of each run left out of the timing (compilation, autotuning, start-up)
    audit_records: int
    audit_size: int
    audit_batch: int
    mark_batch: int  # images per mark_batch call (one user's K)
    mark_images: dict[int, int]  # images marked per measurement, by image side ...
    mark_seconds: float  # ... or fewer on the device, when they take longer than this
    ddp_batches: int  # measured batches per rank in the DDP part
    repeats: int
    warm_runs: int  # untimed runs of each side first (FFCV's compiled pipeline, cuDNN's autotuning)
    model: dict[str, Any]  # train settings replacing the recipe's model (ResNet-50 is too slow for CPU tests)
    dag: tuple[str, ...]  # --set overrides of the recipe for the dag part
    time_box: dict[str, int]  # seconds per part
    budget_s: int  # all parts together


FULL = Scale(
    classes=10,
    per_class=52,
    jpeg_sizes=((500, 375), (375, 500), (400, 400)),
    train_records=12288,
    train_batch=512,
    train_resolutions=(160, 192),
    warm_batches=4,
    audit_records=8192,
    audit_size=256,
    audit_batch=512,
    mark_batch=64,
    mark_images={224: 4096, 32: 8192},
    mark_seconds=4.0,
    ddp_batches=16,
    repeats=3,
    warm_runs=1,
    model={},
    dag=(
        "data.n_train=312",
        "plan.n_member_users=4",
        "plan.n_nonmember_users=8",
        "plan.samples_per_user=8",
        "train.epochs=2",
        "train.resize_epochs=[0,1]",
        "train.batch_size=64",
        "audit.batch_size=64",
        "launch.mark_shards=2",
        "launch.audit_shards=2",
    ),
    time_box={"prepare": 60, "mark": 60, "train": 150, "audit": 60, "dag": 150, "ddp": 90},
    budget_s=480,
)
TINY = Scale(  # one crop size, one arm in the DAG: every code path, at the least CPU time
    classes=4,
    per_class=16,
    jpeg_sizes=((48, 40), (40, 48), (44, 44)),
    train_records=64,
    train_batch=8,
    train_resolutions=(32,),
    warm_batches=2,
    audit_records=64,
    audit_size=32,
    audit_batch=16,
    mark_batch=4,
    mark_images={32: 8, 16: 8},
    mark_seconds=30.0,
    ddp_batches=2,
    repeats=1,
    warm_runs=0,
    model={"arch": "small_cnn", "width": 8},
    dag=(
        "data.image_size=32",
        "data.max_resolution=64",
        "data.n_train=48",
        "plan.n_member_users=2",
        "plan.n_nonmember_users=2",
        "plan.samples_per_user=2",
        "train.min_resolution=32",
        "train.resolution=64",
        "train.eval_resolution=64",
        "train.epochs=2",
        "train.resize_epochs=[0,1]",
        "train.batch_size=8",
        "train.arms=[marked]",
        "audit.batch_size=16",
        "launch.mark_shards=2",
        "launch.audit_shards=2",
    ),
    time_box={"prepare": 300, "mark": 300, "train": 300, "audit": 300, "dag": 900, "ddp": 300},
    budget_s=2400,
)


@dataclass(frozen=True)
class Context:
    """What a part knows: the device, the sizes, its work folder and the report of the parts before it."""

    device: str  # "cuda" or "cpu"
    scale: Scale
    work: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.work / "folder"

    @property
    def train_beton(self) -> Path:
        return self.work / "train.beton"

    @property
    def audit_beton(self) -> Path:
        return self.work / "audit.beton"

    @property
    def prepared(self) -> Path:
        """Written last by `prepare`: the folder and betons are complete."""
        return self.work / "prepared.json"

    @property
    def cores(self) -> int:
        return os.cpu_count() or 1

    def workers(self, configured: int) -> int:
        return max(1, min(configured, self.cores))

    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name() if self.device == "cuda" else cpu_model()


def with_target(row: dict[str, Any], target: float) -> dict[str, Any]:
    """A result row with the ratio it should reach."""
    return {**row, "target": target}


def throughput(per: str, what: str, rates: dict[int, float], arch: str | None = None) -> dict[str, Any]:
    """A measured rate for the cost estimate (pipeline/launchers/cost.py): images/s of one `per` by
    image side, and the model it is for."""
    entry = {"per": per, "what": what, "images_per_s": {str(size): rate for size, rate in rates.items()}}
    return entry if arch is None else {**entry, "arch": arch}


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Counts batches and times them from batch `warm` on, synchronising the device at both ends."""

    def __init__(self, warm: int, device: Any) -> None:
        self.warm, self.device, self.batches, self.images, self.start = warm, device, 0, 0, 0.0

    def tick(self, images: int) -> None:
        """Call before each batch is processed."""
        if self.batches == self.warm:
            _sync(self.device)
            self.start = time.perf_counter()
        if self.batches >= self.warm:
            self.images += images
        self.batches += 1

    def images_per_s(self) -> float:
        _sync(self.device)
        if self.batches <= self.warm:
            raise RuntimeError(f"only {self.batches} batches, none after the {self.warm} warm-up batches")
        return self.images / (time.perf_counter() - self.start)


# --- prepare ------------------------------------------------------------------------------------


class Cycled:
    """`count` records cycling through `images`: a large beton from a few distinct images (decoding
    and storing cost the same per record whether or not an image repeats)."""

    def __init__(self, images: Any, count: int) -> None:
        self.images, self.count = images, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[int(i) % len(self.images)]


def part_prepare(ctx: Context) -> dict[str, Any]:
    from bench.common import write_jpeg_folder
    from pipeline.config import DataConfig, load_config
    from pipeline.data.betons import ImageStorage, write_beton
    from pipeline.data.sources import StoredImages, load_source

    s, recipe = ctx.scale, load_config(RECIPE)
    for path in (ctx.prepared, ctx.folder, ctx.train_beton, ctx.audit_beton):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    start = time.perf_counter()
    write_jpeg_folder(ctx.folder, "train", s.classes, s.per_class, s.jpeg_sizes)
    write_jpeg_folder(ctx.folder, "val", s.classes, 2, s.jpeg_sizes, seed=1)
    folder_s = time.perf_counter() - start
    data = load_source(DataConfig(source="imagefolder", root=str(ctx.folder), image_size=s.audit_size, n_train=10))
    d, workers, n = recipe.data, ctx.workers(recipe.train.num_workers), s.train_records
    storage = ImageStorage(
        mode=d.clean_write_mode, jpeg_quality=d.jpeg_quality, compress_probability=d.compress_probability
    )
    start = time.perf_counter()
    write_beton(
        ctx.train_beton,
        Cycled(StoredImages(data.train_images, d.max_resolution), n),
        np.resize(data.train_labels, n),
        np.arange(n),
        num_workers=workers,
        storage=storage,
    )
    write_s = time.perf_counter() - start
    rng, k = np.random.default_rng(0), recipe.plan.samples_per_user
    distinct = rng.integers(0, 256, (min(s.audit_records, 512), s.audit_size, s.audit_size, 3), dtype=np.uint8)
    m = s.audit_records
    write_beton(
        ctx.audit_beton,
        Cycled(distinct, m),
        rng.integers(0, NUM_CLASSES, m),
        np.arange(m),
        np.arange(m) // k,
        num_workers=workers,
    )
    details = {
        "jpeg_files": len(data.train_labels),
        "folder_s": folder_s,
        "train_records": n,
        "write_s": write_s,
        "writer_workers": workers,
        "audit_records": m,
    }
    from pipeline.store import write_json

    write_json(ctx.prepared, details)
    what = (
        f"FFCV writer from JPEG files, longer side <= {d.max_resolution} px, {d.compress_probability:.0%} JPEG "
        f"q{d.jpeg_quality}, {workers} workers"
    )
    rate = {d.max_resolution: n / write_s / workers}
    return {"details": details, "throughput": {"write": throughput("worker", what, rate)}}


# --- mark ---------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # a marking pool worker's config and, by image side, its own inputs


def _mark_inputs(size: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from pipeline.core.marking import stripe_pattern

    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        stripe_pattern(seed, size, size),
        np.arange(batch, dtype=np.uint64) + np.uint64(seed),
    )


def _mark_worker_init(cfg: Any, sizes: tuple[int, ...], batch: int) -> None:
    """A pool worker's own images, so that tasks carry no pixels (the mark stage reads its own)."""
    _WORKER["cfg"] = cfg
    for size in sizes:
        _WORKER[f"inputs {size}"] = _mark_inputs(size, batch, os.getpid())
        _mark_on_cpu(size)  # load the compiled kernels before anything is timed


def _mark_on_cpu(size: int) -> int:
    from pipeline.core.marking import mark_batch

    return len(mark_batch(*_WORKER[f"inputs {size}"], _WORKER["cfg"], None))


def part_mark(ctx: Context) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.config import load_config
    from pipeline.core.marking import mark_batch

    s, cfg = ctx.scale, load_config(RECIPE).mark
    sizes, k, cores = tuple(s.mark_images), s.mark_batch, ctx.cores
    mine = {size: _mark_inputs(size, k, 0) for size in sizes}
    for size in sizes:  # warm-up: CUDA context and kernels
        mark_batch(*mine[size], cfg, ctx.device)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # one core per worker
    with ProcessPoolExecutor(
        cores, mp_context=multiprocessing.get_context("spawn"), initializer=_mark_worker_init, initargs=(cfg, sizes, k)
    ) as pool:
        list(pool.map(_mark_on_cpu, [sizes[0]] * 4 * cores))  # start every worker before timing

        def on_device(size: int) -> float:
            start, done = time.perf_counter(), 0
            while done < s.mark_images[size] and time.perf_counter() - start < s.mark_seconds:
                done += len(mark_batch(*mine[size], cfg, ctx.device))
            return done / (time.perf_counter() - start)

        def on_cores(size: int) -> float:
            start = time.perf_counter()
            done = sum(pool.map(_mark_on_cpu, [size] * (s.mark_images[size] // k)))
            return done / (time.perf_counter() - start)

        sides = {
            f"{side} {size}": (lambda run=run, size=size: run(size))
            for size in sizes
            for side, run in (("device", on_device), ("cores", on_cores))
        }
        median = interleaved_medians(sides, s.repeats)
    rows = [
        comparison(
            f"mark {size}x{size} perlin, mark_batch torch-{ctx.device} vs numpy on {cores} cores "
            f"(batches of {k}, {ctx.device_name()})",
            median[f"device {size}"],
            median[f"cores {size}"],
        )
        for size in sizes
    ]
    per = "GPU" if ctx.device == "cuda" else "process"
    rates = {size: median[f"device {size}"] for size in sizes}
    return {"rows": rows, "throughput": {"mark": throughput(per, f"mark_batch on {ctx.device}, batches of {k}", rates)}}


# --- train --------------------------------------------------------------------------------------


def _train_config(ctx: Context, resolution: int, **changes: Any) -> Any:
    """The recipe's training settings on one device of this machine at one crop size (no resizing)."""
    from pipeline.config import TrainConfig, load_config

    recipe = load_config(RECIPE).train
    return TrainConfig.model_validate(
        {
            **recipe.model_dump(),
            "accelerator": "gpu" if ctx.device == "cuda" else "cpu",
            "devices": 1,
            "strategy": "auto",
            "epochs": 1,
            "batch_size": ctx.scale.train_batch,
            "min_resolution": None,
            "resolution": resolution,
            "eval_resolution": resolution,
            "num_workers": ctx.workers(recipe.num_workers),
            **ctx.scale.model,
            **changes,
        }
    )


def _lightning_clock(warm: int) -> Any:
    import lightning as L

    class LightningClock(L.Callback):
        """Images per second of every rank together, from batch `warm` to the end of training."""

        def __init__(self) -> None:
            self.clock: Clock | None = None
            self.rate, self.backend = 0.0, "none"

        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                self.backend = str(dist.get_backend())

        def on_train_batch_start(
            self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            self.clock = self.clock or Clock(warm, module.device)
            self.clock.tick(len(batch[0]) * trainer.world_size)

        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            assert self.clock is not None
            self.rate = self.clock.images_per_s()

    return LightningClock()


def _fit(ctx: Context, cfg: Any) -> tuple[Any, Any]:
    """Train the recipe's model through `Classifier` and `BetonData` as the train stage does; returns
    the clock (images/s, DDP backend) and the trainer."""
    import lightning as L

    from pipeline.training.module import BetonData, Classifier
    from pipeline.training.schedules import resolve_precision

    clock = _lightning_clock(ctx.scale.warm_batches)
    module = Classifier(cfg.arch, NUM_CLASSES, cfg.width, MEAN, STD, cfg.model_dump(mode="json"))
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg),
        max_epochs=cfg.epochs,
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=True,
    )
    trainer.fit(module, datamodule=BetonData(ctx.train_beton, ctx.audit_beton, cfg, seed=0))
    return clock, trainer


def _plain_rate(ctx: Context, cfg: Any) -> float:
    """The same model and loader in a bare loop: zero_grad, autocast forward and loss, backward, step."""
    import torch
    import torch.nn.functional as F

    from pipeline.training.module import BetonData, Classifier
    from pipeline.training.schedules import resolve_precision

    device = torch.device(ctx.device)
    torch.backends.cudnn.benchmark = True
    model = Classifier(cfg.arch, NUM_CLASSES, cfg.width, MEAN, STD, cfg.model_dump(mode="json")).model.to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr * 1e-3, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    bf16 = resolve_precision(cfg) == "bf16-mixed"
    clock = Clock(ctx.scale.warm_batches, device)
    for images, labels, *_ in BetonData(ctx.train_beton, ctx.audit_beton, cfg, seed=0).train_dataloader():
        clock.tick(len(images))
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clock.images_per_s()


def part_train(ctx: Context) -> dict[str, Any]:
    from pipeline.launchers.cost import FFCV_RN50
    from pipeline.training.schedules import resolve_precision

    s = ctx.scale
    configs = {res: _train_config(ctx, res) for res in s.train_resolutions}
    sides = {}
    for res, cfg in configs.items():
        sides[f"lightning {res}"] = lambda cfg=cfg: _fit(ctx, cfg)[0].rate
        sides[f"plain {res}"] = lambda cfg=cfg: _plain_rate(ctx, cfg)
    median = interleaved_medians(sides, s.repeats)
    first, cfg = s.train_resolutions[0], configs[s.train_resolutions[0]]
    setting = (
        f"batch {cfg.batch_size}, {resolve_precision(cfg)}, channels_last {cfg.channels_last}, "
        f"FFCV {cfg.num_workers} workers, {ctx.device_name()}"
    )
    rows = [
        with_target(
            comparison(
                f"{cfg.arch} training at {res} px, Lightning Classifier vs plain PyTorch loop ({setting})",
                median[f"lightning {res}"],
                median[f"plain {res}"],
            ),
            0.95,
        )
        for res in s.train_resolutions
    ]
    published = FFCV_RN50.images_per_s(first)
    rows.append(
        comparison(
            f"{cfg.arch} training at {first} px, Lightning on {ctx.device_name()} vs FFCV's published "
            f"rate per A100 ({FFCV_RN50.where}: 88 epochs in {FFCV_RN50.minutes} min on 8 GPUs)",
            median[f"lightning {first}"],
            published,
        )
    )
    rates = {res: median[f"lightning {res}"] for res in s.train_resolutions}
    what = f"{cfg.arch} training steps through Lightning, {setting}"
    per = "GPU" if ctx.device == "cuda" else "process"
    return {"rows": rows, "throughput": {"train": throughput(per, what, rates, cfg.arch)}}


# --- audit --------------------------------------------------------------------------------------


def part_audit(ctx: Context) -> dict[str, Any]:
    import torch

    from bench.audit import bare_forward
    from pipeline.config import load_config
    from pipeline.core.models import Normalized, build_model, load_weights, save_weights
    from pipeline.stages.audit import score_samples

    s, recipe = ctx.scale, load_config(RECIPE)
    cfg = recipe.audit.model_copy(
        update={"batch_size": s.audit_batch, "num_workers": ctx.workers(recipe.audit.num_workers)}
    )
    device, path = torch.device(ctx.device), ctx.work / "audit-model.pt"
    meta = {
        "arch": recipe.train.arch,
        "width": recipe.train.width,
        **s.model,
        "num_classes": NUM_CLASSES,
        "mean": MEAN,
        "std": STD,
    }
    save_weights(Normalized(build_model(meta["arch"], NUM_CLASSES, meta["width"]), tuple(MEAN), tuple(STD)), meta, path)
    model = load_weights(path)[0].to(device)  # as the audit stage loads a trained model

    def rate(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        _sync(device)
        return s.audit_records / (time.perf_counter() - start)

    sides = {
        "ours": lambda: rate(lambda: score_samples(model, ctx.audit_beton, cfg, device)),
        "bare": lambda: rate(lambda: bare_forward(model, ctx.audit_beton, cfg, device)),
    }
    for _ in range(s.warm_runs):
        for run in sides.values():
            run()
    median = interleaved_medians(sides, s.repeats)
    where = (
        f"{meta['arch']} {s.audit_size}x{s.audit_size} fp32, batch {cfg.batch_size}, {cfg.num_workers} workers, "
        f"{ctx.device_name()}"
    )
    rows = [
        with_target(
            comparison(f"audit scoring, score_samples vs bare forward loop ({where})", median["ours"], median["bare"]),
            0.9,
        )
    ]
    per = "GPU" if ctx.device == "cuda" else "process"
    rates = {s.audit_size: median["ours"]}
    return {"rows": rows, "throughput": {"audit": throughput(per, f"score_samples, {where}", rates, meta["arch"])}}


# --- dag ----------------------------------------------------------------------------------------


def part_dag(ctx: Context) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.store import read_json

    run = ctx.work / "dag"
    shutil.rmtree(run, ignore_errors=True)  # a finished run would be skipped, proving nothing
    recipe = load_config(RECIPE)
    workers = ctx.workers(recipe.train.num_workers)
    overrides = [
        f"data.root={ctx.folder}",
        f"run_dir={run / 'run'}",
        f"results_dir={run / 'results'}",
        *ctx.scale.dag,
        *(f"train.{key}={value}" for key, value in ctx.scale.model.items()),
        f"mark.device={ctx.device}",
        f"train.accelerator={'gpu' if ctx.device == 'cuda' else 'cpu'}",
        "train.devices=1",
        "train.strategy=auto",
        f"train.num_workers={workers}",
        f"audit.num_workers={workers}",
    ]
    command = [sys.executable, "-m", "pipeline.cli", "run", str(RECIPE), *(f"--set={o}" for o in overrides)]
    start, log = time.perf_counter(), run / "mtrack.log"
    run.mkdir(parents=True)
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:  # the launcher's line naming the stage, and the last exception before it
        lines = _error_lines(log.read_text(errors="replace"))
        said, causes = [x for x in lines if x.startswith("error:")], [x for x in lines if not x.startswith("error:")]
        raise RuntimeError(
            f"mtrack run failed: {said[-1] if said else f'exit {code}'}"
            + (f"; cause: {causes[-1]}" if causes else "")
            + f" (log: {log})"
        )
    report = read_json(run / "results" / "metrics.json")
    arms = {
        arm: read_json(run / "run" / f"train-{arm}" / "metrics.json")
        for arm in load_config(RECIPE, overrides).train.arms
    }
    return {
        "details": {
            "seconds": time.perf_counter() - start,
            "overrides": overrides,
            "stage_seconds": report.get("seconds"),
            "set_based_auc": report.get("set_based", {}).get("auc"),
            "train": {
                arm: {k: m.get(k) for k in ("precision", "global_step", "test_accuracy")} for arm, m in arms.items()
            },
        }
    }


# --- ddp ----------------------------------------------------------------------------------------


def ddp_devices(device: str) -> int:
    """Processes of the DDP part: every GPU, or two CPU processes (gloo) for the CPU check."""
    import torch

    return torch.cuda.device_count() if device == "cuda" else 2


def part_ddp(ctx: Context) -> dict[str, Any] | None:
    import torch.distributed as dist

    s, n = ctx.scale, ddp_devices(ctx.device)
    res = s.train_resolutions[0]
    steps_per_epoch = math.ceil(s.train_records / n) // s.train_batch
    epochs = math.ceil((s.warm_batches + s.ddp_batches) / max(steps_per_epoch, 1))
    cfg = _train_config(ctx, res, devices=n, strategy="ddp", epochs=epochs)
    clock, trainer = _fit(ctx, cfg)
    if dist.is_initialized():  # a group left open can abort a rank at exit (seen with gloo)
        dist.destroy_process_group()
    if trainer.global_rank != 0:
        return None  # rank 0 reports for all
    rate, backend = clock.rate, clock.backend
    details = {"devices": n, "backend": backend, "epochs": epochs, "images_per_s": rate}
    single = ctx.report.get("throughput", {}).get("train", {}).get("images_per_s", {}).get(str(res))
    rows = (
        []
        if single is None
        else [
            comparison(
                f"DDP over {n} devices, Lightning all ranks vs {n} x one device ({ctx.device_name()}, {backend}, "
                f"{cfg.arch} at {res} px)",
                rate,
                n * single,
            )
        ]
    )
    return {"rows": rows, "details": details}


@dataclass(frozen=True)
class Part:
    run: Callable[[Context], dict[str, Any] | None]
    needs_prepare: bool = False


PARTS: dict[str, Part] = {
    "prepare": Part(part_prepare),
    "mark": Part(part_mark),
    "train": Part(part_train, needs_prepare=True),
    "audit": Part(part_audit, needs_prepare=True),
    "dag": Part(part_dag, needs_prepare=True),
    "ddp": Part(part_ddp, needs_prepare=True),
}


# --- the orchestrator ---------------------------------------------------------------------------


def nvidia_smi() -> dict[str, Any]:
    """GPU names, memory and driver as nvidia-smi reports them (creating no CUDA context in this
    process), and the newest CUDA the driver supports; empty without nvidia-smi."""
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        rows = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    gpus = [dict(zip(("name", "driver", "memory"), (v.strip() for v in row.split(",")))) for row in rows if row]
    info: dict[str, Any] = {"gpus": gpus, **({"name": gpus[0]["name"], "driver": gpus[0]["driver"]} if gpus else {})}
    if found := re.search(r"CUDA Version:\s*([\d.]+)", header):
        info["driver_cuda"] = found[1]
    return info


def environment(device: str) -> dict[str, Any]:
    """torch's and the GPUs' versions: what decides whether two gpu.json files are comparable."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "count": 0}
    if device != "cuda":
        return info
    info.update(count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version(), **nvidia_smi())
    info.setdefault("name", torch.cuda.get_device_name(0))
    return info


# An exception's last traceback line (`[rank1]: ` is how torch's elastic launcher prefixes ranks' output),
# or the one-line `error:` of the pipeline's command line.
ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[\w.]*(?:Error|Exception|Interrupt)(?::.*)?|error: .*)$")


def _error_lines(text: str) -> list[str]:
    """The lines of a log that say what went wrong (exceptions, `error:` lines), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    return [line[:500] for line in (errors or lines[-1:] or ["no output"])]


def _children_cpu_s() -> float:
    """CPU seconds of the finished processes this one started (and theirs, where they waited for them)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_part(name: str, ctx: Context, report_path: Path, timeout: float) -> dict[str, Any]:
    """Run one part in its own process group under `timeout`; its status, and its results if it passed."""
    logs, result = ctx.work / "logs", ctx.work / "results" / f"{name}.json"
    logs.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--part",
        name,
        "--device",
        ctx.device,
        "--work",
        str(ctx.work),
        "--result",
        str(result),
        "--context",
        str(report_path),
        *(["--tiny"] if ctx.scale is TINY else []),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start, cpu = time.perf_counter(), _children_cpu_s()
    with open(logs / f"{name}.log", "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # also when this process is interrupted: its loader, pool and DDP workers go with it
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    status: dict[str, Any] = {
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_s": round(_children_cpu_s() - cpu, 1),
        "log": str(logs / f"{name}.log"),
    }
    if code is None:
        return {"status": FAILED, "error": f"timed out after {timeout:.0f} s (its time box)", **status}
    if code != 0:
        return {
            "status": FAILED,
            "error": _error_lines((logs / f"{name}.log").read_text(errors="replace"))[-1],
            **status,
        }
    if not result.is_file():
        return {"status": FAILED, "error": "ended without writing its results", **status}
    return {"status": PASSED, **status, **json.loads(result.read_text())}


def skip_reason(name: str, ctx: Context, remaining: float) -> str | None:
    if name == "ddp" and ctx.device == "cuda" and ddp_devices("cuda") < 2:
        return "one GPU: DDP over NCCL needs two or more"
    if PARTS[name].needs_prepare and not ctx.prepared.is_file():
        return "needs the prepare part, which has not passed"
    if remaining < min(30, ctx.scale.time_box[name]):
        return f"out of time: {remaining:.0f} s of the budget left"
    return None


def collect(report: dict[str, Any]) -> None:
    """Top-level rows and throughputs from the parts', in part order."""
    parts = [report["parts"][name] for name in PARTS if name in report["parts"]]
    report["rows"] = [row for part in parts for row in part.get("rows", [])]
    report["throughput"] = {key: value for part in parts for key, value in part.get("throughput", {}).items()}


def readme_line(report: dict[str, Any]) -> str:
    """The benchmark README's summary of gpu.json: the GPU, each part's status, each row's ratio."""
    gpu = report["gpu"]
    statuses = ", ".join(f"{name} {part['status']}" for name, part in report["parts"].items())
    rows = []
    for row in report["rows"]:
        met = "met" if row["ratio"] >= row.get("target", 0) else "missed"
        target = f", target {row['target']} {met}" if "target" in row else ""
        rows.append(
            f"{row['case'].split(' (')[0]}: {row['ratio']:.2f}× ({row['ours']:,.0f} vs {row['baseline']:,.0f} "
            f"{row['unit']}{target})"
        )
    return (
        f"- `gpu.json` — `make gpu-check` on {gpu.get('name')} (driver {gpu.get('driver')}, CUDA "
        f"{gpu.get('cuda_runtime')}), {report['started'][:10]}: {statuses}. " + "; ".join(rows)
    )


def orchestrate(args: argparse.Namespace) -> int:
    scale = TINY if args.tiny else FULL
    work = Path(args.work or REPO / "runs" / f"gpu-check-{args.device}{'-tiny' if args.tiny else ''}").resolve()
    out = Path(args.out or (GPU_JSON if args.device == "cuda" and not args.tiny else work / "gpu.json")).resolve()
    if out == GPU_JSON and (args.device != "cuda" or args.tiny):
        print(
            f"error: --out {GPU_JSON}: holds full-size CUDA numbers only; write CPU or --tiny runs elsewhere",
            file=sys.stderr,
        )
        return 2
    names = list(PARTS) if args.parts is None else args.parts.split(",")
    if unknown := [n for n in names if n not in PARTS]:
        print(f"error: --parts: unknown part {', '.join(unknown)} (parts: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        smi = nvidia_smi()
        driver = (
            f"nvidia-smi: driver {smi.get('driver')}, CUDA up to {smi.get('driver_cuda')}" if smi else "no nvidia-smi"
        )
        print(
            f"error: --device cuda: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU "
            f"({driver}); --device cpu --tiny checks the CPU path",
            file=sys.stderr,
        )
        return 2
    from pipeline.store import write_json

    work.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if args.parts and out.is_file() else {}
    if (previous.get("device"), previous.get("scale")) != (args.device, "tiny" if args.tiny else "full"):
        previous = {}  # only a rerun of some parts on the same device and scale keeps the others' results
    gpu = environment(args.device)
    report: dict[str, Any] = {
        "rows": [],
        "machine": machine() + (f", {gpu['name']} x {gpu['count']}" if gpu.get("name") else ""),
        "device": args.device,
        "scale": "tiny" if args.tiny else "full",
        "gpu": gpu,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "budget_s": args.budget_s or scale.budget_s,
        "parts": previous.get("parts", {}),
        "throughput": {},
    }
    ctx = Context(args.device, scale, work)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # runs run_part's clean-up
    boxes = {**scale.time_box, **dict((k, int(v)) for k, v in (item.split("=", 1) for item in args.time_box))}
    deadline = time.monotonic() + report["budget_s"]
    collect(report)
    write_json(out, report)
    for name in names:
        remaining = deadline - time.monotonic()
        reason = skip_reason(name, ctx, remaining)
        print(f"gpu-check: {name} ...", flush=True)
        if reason is not None:
            report["parts"][name] = {"status": SKIPPED, "reason": reason}
        else:
            report["parts"][name] = run_part(name, ctx, out, min(boxes[name], remaining))
        part = report["parts"][name]
        why = "".join(f" ({part[key]})" for key in ("reason", "error") if key in part)
        print(f"gpu-check: {name} {part['status']}{why}", flush=True)
        collect(report)
        write_json(out, report)
    for row in report["rows"]:
        print(
            f"{row['case']}\n    ours {row['ours']:,.1f}  baseline {row['baseline']:,.1f} {row['unit']}  "
            f"x{row['ratio']:.3f}" + (f" (target {row['target']})" if "target" in row else "")
        )
    print(f"gpu-check: wrote {out}")
    if out == GPU_JSON:
        update_bench_readme("gpu.json", readme_line(report))
    return 1 if any(p["status"] == FAILED for p in report["parts"].values()) else 0


def run_one_part(args: argparse.Namespace) -> int:
    """Inside a part's own process: run it and leave its results where the orchestrator reads them."""
    from pipeline.store import write_json

    context = Path(args.context)
    ctx = Context(
        args.device,
        TINY if args.tiny else FULL,
        Path(args.work),
        json.loads(context.read_text()) if context.is_file() else {},
    )
    result = PARTS[args.part].run(ctx)
    if result is not None:
        write_json(args.result, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (seconds per part): the CPU test of every path")
    parser.add_argument("--work", help="folder for data, logs and runs (default runs/gpu-check-<device>)")
    parser.add_argument("--out", help="the JSON to write (default: results/bench/gpu.json on CUDA, else in --work)")
    parser.add_argument(
        "--parts",
        help=f"comma-separated subset of {','.join(PARTS)} to (re)run; the JSON keeps the other parts' results",
    )
    parser.add_argument("--budget-s", type=int, help="seconds for all parts together (default 480 on CUDA)")
    parser.add_argument(
        "--time-box",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="override one part's time box (repeatable)",
    )
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # the orchestrator's child processes
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [
        item
        for item in args.time_box
        if "=" not in item or item.split("=", 1)[0] not in PARTS or not item.split("=", 1)[1].isdigit()
    ]
    if bad:
        print(f"error: --time-box {bad[0]}: expected PART=SECONDS with a part of {', '.join(PARTS)}", file=sys.stderr)
        return 2
    return run_one_part(args) if args.part else orchestrate(args)


if __name__ == "__main__":
    run_reporting_errors(main)
