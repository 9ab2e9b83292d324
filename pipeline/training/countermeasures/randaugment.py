"""RandAugment on the training batches (`train.defense.randaugment`), drawn per image or, as the
official MembershipTracker code augments, once per batch."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ...config import RandAugmentConfig
from .base import Countermeasure, register


def randaugment(images: torch.Tensor, cfg: RandAugmentConfig) -> torch.Tensor:
    """torchvision's RandAugment with one draw per image (`per: sample`) or one per batch."""
    op = v2.RandAugment(num_ops=cfg.num_ops, magnitude=cfg.magnitude)
    return op(images) if cfg.per == "batch" else torch.stack([op(image) for image in images])


@register
class RandAugment(Countermeasure):
    fields = ("randaugment",)
    order = 1
    transforms_batches = True

    def transform(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cfg.defense.randaugment is not None  # switched on by this key
        return randaugment(images, self.cfg.defense.randaugment), targets
