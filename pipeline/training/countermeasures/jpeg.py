"""JPEG re-encoding of every training image (`train.defense.jpeg_quality`): what a data pipeline
that stores or ships images as JPEG does to a mark's fine noise."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import Countermeasure, register


def reencode_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Every image through a JPEG encode and decode at `quality` (Pillow, as a data pipeline would
    do it). Deterministic, so re-encoding each batch equals re-encoding the training set once."""
    out = []
    for image in images.cpu().permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(2) if image.shape[2] == 1 else image).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer)).reshape(image.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device)


@register
class JpegReencoding(Countermeasure):
    fields = ("jpeg_quality",)
    order = 0
    transforms_batches = True

    def transform(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reencode_jpeg(images, int(self.cfg.defense.jpeg_quality or 100)), targets
