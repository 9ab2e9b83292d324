"""DP-SGD through Opacus (`train.defense.dp`): per-sample gradients clipped and noised, the network
made per-sample-gradient compatible (BatchNorm -> GroupNorm), fp32, and the epsilon spent reported."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn

from ...config import DPConfig, TrainConfig
from ...core.models import dp_compatible
from .base import Countermeasure, register


def make_private(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DPConfig, batch_size: int
) -> tuple[Any, torch.optim.Optimizer]:
    """Per-sample gradients for `model` (hooks; the returned wrapper must stay referenced) and an
    optimizer that clips them and adds Gaussian noise before each step."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    wrapped = GradSampleModule(model)
    return wrapped, DPOptimizer(
        optimizer,
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=batch_size,
    )


def dp_epsilon(cfg: DPConfig, sample_rate: float, steps: int) -> float:
    """Privacy spent (epsilon at cfg.delta, RDP accounting) after `steps` noisy steps at `sample_rate`.
    Batches are shuffled, not Poisson-sampled, so this is the usual approximation."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if cfg.noise_multiplier == 0:
        return math.inf
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=cfg.noise_multiplier, steps=steps, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=cfg.delta)[0])


@register
class DPSGD(Countermeasure):
    fields = ("dp",)
    precision = "32-true"  # per-sample gradients in full precision

    def __init__(self, cfg: TrainConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        assert cfg.defense.dp is not None  # switched on by this key
        self.dp = cfg.defense.dp
        self.grad_sample: list[Any] = []  # Opacus's per-sample-gradient wrapper, kept alive (not a submodule)

    def wrap_network(self, net: nn.Module) -> nn.Module:
        return dp_compatible(net)

    def wrap_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        wrapper, private = make_private(model, optimizer, self.dp, self.cfg.batch_size)
        self.grad_sample = [wrapper]
        return private

    def finish(self, module: L.LightningModule, trainer: L.Trainer, train_samples: int) -> dict[str, Any]:
        sample_rate = min(self.cfg.batch_size * trainer.world_size / train_samples, 1.0)
        return {"dp_epsilon": dp_epsilon(self.dp, sample_rate, trainer.global_step)}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"group_norm": True}
