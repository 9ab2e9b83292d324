"""How visible a mark is: PSNR and SSIM of marked images against their originals."""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def psnr(original: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for uint8 batches (B, H, W, C)."""
    mse = ((original.astype(np.float64) - marked.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


def ssim(original: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Per-image SSIM (scikit-image, colour, 7x7 windows shrunk to fit small images)."""
    win = min(7, original.shape[1], original.shape[2])
    win -= 1 - win % 2
    return np.array(
        [structural_similarity(o, m, channel_axis=-1, data_range=255, win_size=win) for o, m in zip(original, marked)]
    )
