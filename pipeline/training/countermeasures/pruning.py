"""Global magnitude pruning (`train.defense.prune_fraction`), optionally followed by fine-tuning
for the last `finetune_epochs`: the released model has the smallest weights zeroed."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ...config import TrainConfig
from .base import Countermeasure, register


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


def sparsity(model: nn.Module) -> float:
    """Share of conv and linear weights that are exactly zero."""
    weights = prunable_weights(model).values()
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


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


@register
class Pruning(Countermeasure):
    fields = ("prune_fraction", "finetune_epochs")

    def __init__(self, cfg: TrainConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.pruning = MagnitudePruning(cfg.defense.prune_fraction, cfg.epochs - cfg.defense.finetune_epochs)

    def callbacks(self) -> list[Callback]:
        return [self.pruning]

    def finish(self, module: L.LightningModule, trainer: L.Trainer, train_samples: int) -> dict[str, Any]:
        self.pruning.prune(module)  # the released model is pruned, whichever checkpoint it comes from
        return {"sparsity": sparsity(module.model)}
