"""MixUp or CutMix on every training batch (`train.defense.mix`, `mix_alpha`): the model trains
against mixed class probabilities, never on one image alone."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from ...config import TrainConfig
from ...registry import Registry
from .base import Countermeasure, register

MIXES: Registry[type[v2.Transform]] = Registry("train.defense.mix")
MIXES.register("mixup")(v2.MixUp)
MIXES.register("cutmix")(v2.CutMix)


@register
class Mixing(Countermeasure):
    fields = ("mix", "mix_alpha")
    order = 2
    transforms_batches = True

    def __init__(self, cfg: TrainConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.mix: Any = MIXES.lookup(str(cfg.defense.mix))(alpha=cfg.defense.mix_alpha, num_classes=num_classes)

    def transform(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(images.float(), targets)
