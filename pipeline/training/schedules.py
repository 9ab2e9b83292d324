"""The training recipe's schedules: learning rate per step, crop size per epoch, numeric precision."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import TrainConfig
from ..registry import Registry


def eval_resolution(cfg: TrainConfig) -> int | None:
    return cfg.eval_resolution or cfg.resolution


# Learning-rate decay after warm-up: (config, progress through the decay in [0, 1], epoch) -> factor.
DECAYS: Registry[Callable[[TrainConfig, float, float], float]] = Registry("train.schedule")
DECAYS.register("constant")(lambda c, progress, epoch: 1.0)
DECAYS.register("cosine")(lambda c, progress, epoch: 0.5 * (1.0 + math.cos(math.pi * progress)))
DECAYS.register("linear")(lambda c, progress, epoch: 1.0 - progress)
DECAYS.register("multistep")(lambda c, progress, epoch: c.gamma ** sum(epoch >= m for m in c.milestones))


def lr_factor(cfg: TrainConfig, steps_per_epoch: float, total_steps: int) -> Callable[[int], float]:
    """Multiplier of train.lr at each optimizer step: a linear ramp over warmup_epochs, then the
    schedule's decay over the remaining steps (multistep milestones count whole epochs)."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    decay = DECAYS.lookup(cfg.schedule)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(cfg, (step - warmup) / max(1, total_steps - warmup), step / steps_per_epoch)

    return factor


def resolve_precision(cfg: TrainConfig, required: str | None = None) -> str:
    """Mixed precision where the hardware has it: bf16 on recent GPUs and on CPUs with native bf16
    (AVX512-BF16/AMX, about 2.5x faster here), fp16 on older GPUs, else fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    if required is not None:  # a countermeasure's (DP-SGD: per-sample gradients in full precision)
        return required
    if cfg.accelerator != "cpu" and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"
