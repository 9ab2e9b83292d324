"""Countermeasures a model trainer could apply against the audit (`train.defense`), each a switch of
the training stage so the same pipeline measures how much of the audit survives it.

Batch-level ones (JPEG re-encoding, RandAugment, MixUp/CutMix) transform the training batches on
their way into the model; outlier filtering picks the training images before training; pruning,
early stopping and DP-SGD act on the model and its optimizer.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from ..config import DefenseConfig, DPConfig, RandAugmentConfig
from ..store import write_json

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def reencode_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Every image through a JPEG encode and decode at `quality` (Pillow, as a data pipeline would
    do it). Deterministic, so re-encoding each batch equals re-encoding the training set once."""
    out = []
    for image in images.cpu().permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(2) if image.shape[2] == 1 else image).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer)).reshape(image.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device)


def randaugment(images: torch.Tensor, cfg: RandAugmentConfig) -> torch.Tensor:
    """torchvision's RandAugment with one draw per image (`per: sample`) or one per batch."""
    op = v2.RandAugment(num_ops=cfg.num_ops, magnitude=cfg.magnitude)
    return op(images) if cfg.per == "batch" else torch.stack([op(image) for image in images])


MIXES: dict[str, type[v2.Transform]] = {"mixup": v2.MixUp, "cutmix": v2.CutMix}


def batch_transforms(cfg: DefenseConfig, num_classes: int) -> list[BatchTransform]:
    """The batch-level countermeasures in the order a trainer would apply them: the stored data
    (JPEG), then augmentation, then mixing (which turns labels into class probabilities)."""
    steps: list[BatchTransform] = []
    if cfg.jpeg_quality is not None:
        quality = cfg.jpeg_quality
        steps.append(lambda images, targets: (reencode_jpeg(images, quality), targets))
    if cfg.randaugment is not None:
        augment = cfg.randaugment
        steps.append(lambda images, targets: (randaugment(images, augment), targets))
    if cfg.mix is not None:
        mix = MIXES[cfg.mix](alpha=cfg.mix_alpha, num_classes=num_classes)
        steps.append(lambda images, targets: mix(images.float(), targets))
    return steps


def outlier_scores(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How unusual each image looks for its class: the mean squared z-score of its features
    against its class's per-feature mean and spread (a diagonal Mahalanobis distance)."""
    scores = np.zeros(len(labels))
    for cls in np.unique(labels):
        rows = labels == cls
        mean, std = features[rows].mean(0), features[rows].std(0) + 1e-6
        scores[rows] = (((features[rows] - mean) / std) ** 2).mean(1)
    return scores


def select_inliers(loader: Iterable[tuple[torch.Tensor, ...]], fraction: float,
                   record: Path) -> tuple[np.ndarray, dict[str, int]]:
    """Positions (in the training file) of the images kept after dropping the `fraction` of each
    class that looks most unusual, judged on 8x8 average-pooled pixels, and counts of what was
    dropped (how many marked images among it); `record` also lists the dropped sample ids."""
    features, labels, samples, users = [], [], [], []
    for images, label, sample, user in loader:
        features.append(F.adaptive_avg_pool2d(images.float(), 8).flatten(1).numpy())
        labels.append(label.numpy()), samples.append(sample.numpy()), users.append(user.numpy())
    feats, label_arr = np.concatenate(features), np.concatenate(labels)
    sample_arr, user_arr = np.concatenate(samples), np.concatenate(users)
    scores = outlier_scores(feats, label_arr)
    dropped = np.zeros(len(scores), bool)
    for cls in np.unique(label_arr):
        rows = np.flatnonzero(label_arr == cls)
        dropped[rows[np.argsort(-scores[rows], kind="stable")[: math.ceil(fraction * len(rows))]]] = True
    marked = user_arr >= 0
    counts = {"dropped": int(dropped.sum()), "marked": int(marked.sum()), "marked_dropped": int((dropped & marked).sum())}
    write_json(record, {"fraction": fraction, **counts, "dropped_sample_ids": sorted(int(i) for i in sample_arr[dropped])})
    return np.flatnonzero(~dropped), counts


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The conv and linear weights, by module name: what pruning acts on."""
    return {name: module.weight for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}


def magnitude_masks(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Masks keeping all but the `fraction` smallest-magnitude conv and linear weights, under one
    threshold shared by all layers (global magnitude pruning)."""
    weights = {name: w.detach() for name, w in prunable_weights(model).items()}
    magnitudes = torch.cat([w.abs().flatten().float() for w in weights.values()])
    k = int(fraction * magnitudes.numel())
    threshold = magnitudes.kthvalue(k).values if k > 0 else magnitudes.new_tensor(-1.0)
    return {name: w.abs().float() > threshold for name, w in weights.items()}


class MagnitudePruning(Callback):
    """Prunes the model at the start of epoch `start_epoch` (or, when that is the end of training,
    after the last step) and keeps the pruned weights at zero while the remaining epochs fine-tune
    the rest. The masks live in the checkpoints, so a resumed run keeps them."""

    def __init__(self, fraction: float, start_epoch: int) -> None:
        self.fraction, self.start_epoch = fraction, start_epoch
        self.masks: dict[str, torch.Tensor] = {}

    def _apply(self, module: L.LightningModule) -> None:
        weights = prunable_weights(module.model)
        with torch.no_grad():
            for name, mask in self.masks.items():
                weights[name].mul_(mask.to(weights[name].device))

    def prune(self, module: L.LightningModule) -> None:
        if not self.masks:
            self.masks = magnitude_masks(module.model, self.fraction)
        self._apply(module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            self.prune(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.masks:  # the optimizer step moved the pruned weights: put them back to zero
            self._apply(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.prune(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = state_dict["masks"]


def sparsity(model: nn.Module) -> float:
    """Share of conv and linear weights that are exactly zero."""
    weights = prunable_weights(model).values()
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DPConfig,
                 batch_size: int) -> tuple[Any, torch.optim.Optimizer]:
    """Per-sample gradients for `model` (hooks; the returned wrapper must stay referenced) and an
    optimizer that clips them and adds Gaussian noise before each step."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    wrapped = GradSampleModule(model)
    return wrapped, DPOptimizer(optimizer, noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                                expected_batch_size=batch_size)


def dp_epsilon(cfg: DPConfig, sample_rate: float, steps: int) -> float:
    """Privacy spent (epsilon at cfg.delta, RDP accountant) after `steps` noisy steps at `sample_rate`.
    Batches are shuffled, not Poisson-sampled, so this is the usual approximation."""
    from opacus.accountants import RDPAccountant

    if cfg.noise_multiplier == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(cfg.noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(cfg.delta))

