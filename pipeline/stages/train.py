"""Stage `train`: a Lightning classifier on FFCV data, for one arm (`marked` or `control`).

The trainer knows nothing of its launcher: accelerator, precision and DDP come from the config
and the environment (Lightning detects SLURM and torchrun), and the stage always resumes from
its own last checkpoint, so a killed or requeued run continues where it stopped (the stage folder
is claimed for one config, so only the same config resumes them; --force starts afresh).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, cast

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from ..config import TrainConfig, WandbConfig
from ..core.models import read_checkpoint, save_weights
from ..store import Stage, StageError, write_json
from ..training.callbacks import (KeepLauncherSigterm, ResumableCheckpoint, SampleRecorder, cluster_plugins,
                                  make_loggers)
from ..training.defenses import MagnitudePruning, dp_epsilon, select_inliers, sparsity
from ..training.module import LOADERS, BetonData, Classifier, evaluate
from ..training.schedules import eval_resolution, resolve_precision

log = logging.getLogger("pipeline")

ARM_TRAIN_SET = {"marked": "train_marked.beton", "control": "train_clean.beton"}


def run_train(stage: Stage, arm: str, cfg: TrainConfig, write_dir: Path, num_classes: int,
              mean: list[float], std: list[float], seed: int, val_every: int,
              wandb: WandbConfig = WandbConfig(), experiment: str = "run") -> None:
    L.seed_everything(seed, workers=True, verbose=False)
    train_path, test_path = write_dir / ARM_TRAIN_SET[arm], write_dir / "test.beton"
    module = Classifier(cfg.arch, num_classes, cfg.width, mean, std, cfg.model_dump(mode="json"))
    defense, extra, indices = cfg.defense, {}, None
    if defense.outlier_fraction:
        scan = LOADERS[cfg.loader](train_path, 512, cfg.num_workers, train=False, resolution=eval_resolution(cfg))
        indices, extra["outliers"] = select_inliers(scan, defense.outlier_fraction, stage.path("outliers.json"))
    data = BetonData(train_path, test_path, cfg, seed, indices)
    ckpt_dir = stage.path("checkpoints")
    last = ckpt_dir / "last.ckpt"
    if last.exists():  # one clear line, rather than a traceback from inside fit, if it cannot be resumed
        try:
            read_checkpoint(last)
        except StageError as exc:
            raise StageError(f"{exc}; delete it to train from the start") from None
        log.info("train-%s: resuming from %s", arm, last)
    # A resumed run rewrites the files it had written before the kill instead of versioning them.
    checkpoint = ResumableCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=cfg.checkpoint_every_n_steps,
                                     enable_version_counter=False)
    best = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_acc", mode="max", save_top_k=1, save_on_train_epoch_end=False,
                           filename="best-{epoch}-{val_acc:.4f}", auto_insert_metric_name=False,
                           enable_version_counter=False)
    callbacks: list[Callback] = [checkpoint, best, KeepLauncherSigterm()] + ([SampleRecorder(stage.path("seen"))] if cfg.record_samples else [])
    if defense.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", patience=defense.early_stopping_patience))
    pruning = MagnitudePruning(defense.prune_fraction, cfg.epochs - defense.finetune_epochs) if defense.prune_fraction else None
    callbacks += [pruning] if pruning is not None else []
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
        precision=resolve_precision(cfg), max_epochs=cfg.epochs, logger=make_loggers(stage, arm, wandb, experiment),
        callbacks=callbacks, plugins=cluster_plugins(), num_sanity_val_steps=0,
        check_val_every_n_epoch=1 if defense.early_stopping_patience else val_every,  # early stopping watches every epoch
        enable_progress_bar=False, enable_model_summary=False, deterministic=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    if wandb.enabled and trainer.global_rank == 0:  # Lightning leaves the run open; close it with the stage
        import wandb as wandb_sdk

        wandb_sdk.finish()
    if trainer.global_rank != 0:
        return
    device = module.device
    if defense.early_stopping_patience is not None:  # the released model is the best one on held-out data
        module.load_state_dict(read_checkpoint(Path(best.best_model_path))["state_dict"])
        extra["stopped_epoch"] = trainer.current_epoch
    if pruning is not None:  # the released model is pruned, whichever checkpoint it comes from
        pruning.prune(module)
        extra["sparsity"] = sparsity(module.model)
    if defense.dp is not None:
        sample_rate = cfg.batch_size * trainer.world_size / cast(Any, data.train_loader).num_samples
        extra["dp_epsilon"] = dp_epsilon(defense.dp, min(sample_rate, 1.0), trainer.global_step)
    meta = {"arch": cfg.arch, "width": cfg.width, "num_classes": num_classes, "mean": mean, "std": std, "arm": arm,
            **({"group_norm": True} if defense.dp is not None else {})}
    save_weights(module.model, meta, stage.path("model.pt"))
    res = eval_resolution(cfg)
    train_loss, train_acc, _ = evaluate(module.model, LOADERS[cfg.loader](train_path, 512, cfg.num_workers, train=False,
                                                                  resolution=res), device, num_classes)
    test_loss, test_acc, class_test_acc = evaluate(
        module.model, LOADERS[cfg.loader](test_path, 512, cfg.num_workers, train=False, resolution=res), device,
        num_classes, cfg.test_time_flip)
    metrics = {
        "arm": arm, "epochs": cfg.epochs, "precision": resolve_precision(cfg),
        "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc,
        "class_test_accuracy": class_test_acc,
        "global_step": trainer.global_step,
        "best_val_checkpoint": Path(best.best_model_path).name if best.best_model_path else None,
        "best_val_accuracy": float(best.best_model_score) if best.best_model_score is not None else None,
        **extra,
    }
    if not math.isfinite(train_loss):
        raise StageError(f"train-{arm}: training diverged (train loss {train_loss}); lower train.lr")
    write_json(stage.path("metrics.json"), metrics)
    stage.finish(["model.pt", "metrics.json"], **metrics)
