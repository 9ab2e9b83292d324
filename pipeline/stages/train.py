"""Stage `train`: a Lightning classifier on FFCV data, for one arm (`marked` or `control`).

The trainer knows nothing of its launcher: accelerator, precision and DDP come from the config
and the environment (Lightning detects SLURM and torchrun), and the stage always resumes from
its own last checkpoint, so a killed or requeued run continues where it stopped (the stage folder
is claimed for one config, so only the same config resumes them; --force starts afresh).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ..core.models import read_checkpoint, save_weights
from ..core.seeds import child_seed
from ..store import StageError, load_npz, write_json
from ..training.callbacks import (
    EpochProgress,
    KeepLauncherSigterm,
    ResumableCheckpoint,
    SampleRecorder,
    cluster_plugins,
    make_loggers,
)
from ..training.countermeasures import active
from ..training.module import LOADERS, BetonData, Classifier, evaluate
from ..training.schedules import eval_resolution, resolve_precision
from .contract import Context
from .tracking import run_config, run_name


def arm_indices(arms_file: Path, arm: str) -> np.ndarray:
    """The records of the training file this arm trains on, in training order (see the write stage)."""
    if not arms_file.is_file():
        raise StageError(
            f"{arms_file}: missing: the write stage was run by an earlier version that wrote one training "
            "file per arm; re-run it with `mtrack write CONFIG --force`"
        )
    return load_npz(arms_file)[arm].astype(np.uint64)


def run_train(ctx: Context) -> None:
    stage, arm, cfg, wandb = ctx.stage, ctx.arm, ctx.config.train, ctx.tracking
    written = ctx.manifest("written")
    num_classes, mean, std = written["num_classes"], written["mean"], written["std"]
    seed, val_every = child_seed(ctx.config.seed, 3) % 2**31, max(1, cfg.epochs // 4)
    L.seed_everything(seed, workers=True, verbose=False)
    train_path, test_path = ctx.input("train_set"), ctx.input("test_set")
    countermeasures = active(cfg, num_classes)
    module = Classifier(cfg.arch, num_classes, cfg.width, mean, std, cfg.model_dump(mode="json"), countermeasures)
    load = LOADERS.lookup(cfg.loader)
    indices, notes = arm_indices(ctx.input("arms"), arm), {}

    def records() -> Any:
        return load(
            train_path,
            cfg.eval_batch_size,
            cfg.num_workers,
            train=False,
            resolution=eval_resolution(cfg),
            indices=indices,
        )

    for countermeasure in countermeasures:
        if (kept := countermeasure.select(records, stage.path("outliers.json"))) is not None:
            positions, selection_notes = kept
            indices = indices[positions]
            notes.update(selection_notes)
    data = BetonData(train_path, test_path, cfg, seed, indices)
    ckpt_dir = stage.path("checkpoints")
    last = ckpt_dir / "last.ckpt"
    if last.exists():  # one clear line, rather than a traceback from inside fit, if it cannot be resumed
        try:
            read_checkpoint(last)
        except StageError as exc:
            raise StageError(f"{exc}; delete it to train from the start") from None
    # A resumed run rewrites the files it had written before the kill instead of versioning them.
    checkpoint = ResumableCheckpoint(
        dirpath=ckpt_dir, save_last=True, every_n_train_steps=cfg.checkpoint_every_n_steps, enable_version_counter=False
    )
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        monitor="val_acc",
        mode="max",
        save_top_k=1,
        save_on_train_epoch_end=False,
        filename="best-{epoch}-{val_acc:.4f}",
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    progress = EpochProgress(stage.name, stage.path("resumes.json"))
    callbacks: list[Callback] = [checkpoint, best, KeepLauncherSigterm(), progress]
    callbacks += [SampleRecorder(stage.path("seen"))] if cfg.record_samples else []
    callbacks += [callback for countermeasure in countermeasures for callback in countermeasure.callbacks()]
    required = {c.precision for c in countermeasures if c.precision is not None}
    precision = resolve_precision(cfg, required.pop() if required else None)
    every_epoch = any(c.validates_every_epoch for c in countermeasures)
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=precision,
        max_epochs=cfg.epochs,
        logger=make_loggers(stage, wandb, run_name(ctx), wandb.group or ctx.experiment, run_config(ctx)),
        callbacks=callbacks,
        plugins=cluster_plugins(),
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1 if every_epoch else val_every,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
        log_every_n_steps=1,
        benchmark=True,  # cuDNN picks the fastest kernels per input shape, as FFCV's recipe does (no effect on CPU)
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    if wandb.enabled and trainer.global_rank == 0:  # Lightning leaves the run open; close it with the stage
        import wandb as wandb_sdk

        wandb_sdk.finish()
    if trainer.global_rank != 0:
        return
    device = module.device
    train_samples = cast(Any, data.train_loader).num_samples
    for countermeasure in countermeasures:  # each turns the trained module into the released model
        notes.update(countermeasure.finish(module, trainer, train_samples))
    # how the model evaluates travels with its weights: the audit decodes images the same way
    meta = {
        "arch": cfg.arch,
        "width": cfg.width,
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "arm": arm,
        "eval_resolution": eval_resolution(cfg),
    }
    for countermeasure in countermeasures:
        meta.update(countermeasure.checkpoint_meta())
    save_weights(module.model, meta, stage.path("model.pt"))
    res = eval_resolution(cfg)
    train_loss, train_acc, _ = evaluate(
        module.model,
        load(
            train_path,
            cfg.eval_batch_size,
            cfg.num_workers,
            train=False,
            resolution=res,
            indices=arm_indices(ctx.input("arms"), arm),
        ),
        device,
        num_classes,
    )
    test_loss, test_acc, class_test_acc = evaluate(
        module.model,
        load(test_path, cfg.eval_batch_size, cfg.num_workers, train=False, resolution=res),
        device,
        num_classes,
        cfg.test_time_flip,
    )
    metrics = {
        "arm": arm,
        "epochs": cfg.epochs,
        "precision": precision,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "class_test_accuracy": class_test_acc,
        "global_step": trainer.global_step,
        "best_val_checkpoint": Path(best.best_model_path).name if best.best_model_path else None,
        "best_val_accuracy": float(best.best_model_score) if best.best_model_score is not None else None,
        **notes,
    }
    if not math.isfinite(train_loss):
        raise StageError(f"train-{arm}: training diverged (train loss {train_loss}); lower train.lr")
    write_json(stage.path("metrics.json"), metrics)
    stage.finish(["model.pt", "metrics.json"], **metrics)
