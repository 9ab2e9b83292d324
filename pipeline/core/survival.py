"""How much of the mark survives storage: kept losslessly, or re-encoded as JPEG.

An audit can only detect a mark the model trained on, and image hosts often re-encode uploads as
JPEG. Per image we correlate the residual actually stored with the residual intended, for the
whole mark (noise and pattern blend) and for the noise part alone: the noise is small (epsilon)
and high-frequency, so it is what lossy compression removes first.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from ..config import MarkConfig
from .marking import noise_delta


def jpeg_roundtrip(images: np.ndarray, quality: int) -> np.ndarray:
    """Each RGB uint8 image (B, H, W, 3) encoded as JPEG at `quality` and decoded again.

    OpenCV reads and writes BGR, so channels are swapped on the way in and back on the way out."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode a {image.shape} image as JPEG")
        out[i] = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each image of `a` with the same image of `b` over all pixels and
    channels: (B,) float64, NaN where either image is constant (correlation undefined)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def _mean_defined(corr: np.ndarray) -> float | None:
    defined = corr[np.isfinite(corr)]
    return float(defined.mean()) if defined.size else None


def mark_survival(
    originals: np.ndarray,
    marked: np.ndarray,
    cfg: MarkConfig,
    patterns: np.ndarray,
    noise_seeds: np.ndarray,
    qualities: Sequence[int] = (75, 90, 95, 100),
) -> dict[str, Any]:
    """Mean per-image correlation between what storage keeps of the mark and the mark intended.

    `originals` and `marked` are (B, H, W, 3) uint8, `marked` as `mark_batch` stored it; `patterns`
    is each image's pattern p, (B, H, W, 3) float32 in [0, 1] (one (H, W, 3) pattern is shared by
    all), and `noise_seeds` the seeds the noise delta was drawn from. The intended mark is recomputed
    in float, before rounding to uint8. For "raw" (the stored uint8 as is) and "jpeg<q>" per quality:
    "full" correlates stored - x with alpha * clip(x + delta) + (1 - alpha) * p - x; "noise"
    correlates stored - (alpha * x + (1 - alpha) * p) with alpha * (clip(x + delta) - x). Images on
    which a target is constant (no noise, or all of it clipped away) are left out of that mean; a
    mean over no image, as for noise "none", is None. Also returns "n_images"."""
    if originals.shape != marked.shape or originals.ndim != 4 or originals.shape[-1] != 3:
        raise ValueError(f"originals {originals.shape} and marked {marked.shape} must both be (B, H, W, 3)")
    n, h, w, _ = originals.shape
    if len(noise_seeds) != n:
        raise ValueError(f"{len(noise_seeds)} noise seeds for {n} images")
    x = originals.astype(np.float64) / 255.0
    p = np.broadcast_to(np.asarray(patterns, dtype=np.float64), x.shape)
    noisy = np.clip(x + noise_delta(cfg.noise, np.asarray(noise_seeds, dtype=np.uint64), h, w, cfg.epsilon), 0.0, 1.0)
    unmarked_blend = cfg.alpha * x + (1.0 - cfg.alpha) * p
    full_target = cfg.alpha * noisy + (1.0 - cfg.alpha) * p - x
    noise_target = cfg.alpha * (noisy - x)
    stored_versions = {"raw": marked, **{f"jpeg{q}": jpeg_roundtrip(marked, q) for q in qualities}}
    result: dict[str, Any] = {}
    for name, stored_uint8 in stored_versions.items():
        stored = stored_uint8.astype(np.float64) / 255.0
        result[name] = {"full": _mean_defined(pearson_rows(stored - x, full_target)),
                        "noise": _mean_defined(pearson_rows(stored - unmarked_blend, noise_target))}
    result["n_images"] = n
    return result
