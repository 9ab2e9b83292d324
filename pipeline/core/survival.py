"""How much of the mark survives storage: kept losslessly, re-encoded as JPEG, or as a run stored it.

An audit can only detect a mark the model trained on, and image hosts often re-encode uploads as
JPEG, and a trainer may store them as JPEG too. Per image we correlate the residual actually
stored with the residual intended, for the whole mark and for its noise and pattern parts alone:
the noise is small (epsilon) and high-frequency, so it is what lossy compression removes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from ..config import MarkConfig
from .marking import noise_delta, shape_groups


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


SURVIVAL_CHUNK = 64  # images of one size whose float residuals are held at once


def _correlations(
    originals: np.ndarray,
    versions: dict[str, np.ndarray],
    cfg: MarkConfig,
    patterns: np.ndarray,
    noise_seeds: np.ndarray,
) -> dict[str, dict[str, np.ndarray]]:
    """Per image of one size and per stored version: the correlation of each part of the mark
    (see `survival_correlations`)."""
    _, h, w, _ = originals.shape
    x = originals.astype(np.float64) / 255.0
    p = np.asarray(patterns, dtype=np.float64)
    noisy = np.clip(x + noise_delta(cfg.noise, np.asarray(noise_seeds, dtype=np.uint64), h, w, cfg.epsilon), 0.0, 1.0)
    noise_target, pattern_target = cfg.alpha * (noisy - x), (1.0 - cfg.alpha) * (p - x)
    out = {}
    for name, stored_uint8 in versions.items():
        residual = stored_uint8.astype(np.float64) / 255.0 - x
        out[name] = {
            "full": pearson_rows(residual, noise_target + pattern_target),
            "noise": pearson_rows(residual - pattern_target, noise_target),
            "pattern": pearson_rows(residual - noise_target, pattern_target),
        }
    return out


def survival_correlations(
    originals: Sequence[np.ndarray],
    marked: Sequence[np.ndarray],
    cfg: MarkConfig,
    patterns: Sequence[np.ndarray],
    noise_seeds: np.ndarray,
    qualities: Sequence[int] = (75, 90, 95, 100),
    stored: dict[str, Sequence[np.ndarray]] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-image correlation between what storage keeps of the mark and the mark intended;
    `summarise_survival` averages them.

    `originals` and `marked` are (H, W, 3) uint8 images (a (B, H, W, 3) array, or a sequence of
    images of varying size), `marked` as `mark_batch` made it; `patterns` holds each image's
    pattern p, (H, W, 3) float32 in [0, 1], and `noise_seeds` the seeds the noise delta was drawn
    from. The intended mark is recomputed in float, before rounding to uint8:
    x' - x = alpha * (clip(x + delta) - x) + (1 - alpha) * (p - x), the noise
    part plus the pattern part. Stored versions: "raw" (the marked uint8 as is), "jpeg<q>" per
    quality (re-encoded with OpenCV), and any given in `stored` (name -> images, e.g. the records a
    run wrote). Per version: "full" correlates stored - x with the whole intended mark; "noise"
    correlates stored - x - pattern part with the noise part; "pattern" correlates stored - x -
    noise part with the pattern part. Images on which a target is constant (no noise, all of it
    clipped away, alpha = 1) are left out of that mean; a mean over no image, as for noise "none",
    is None (in `summarise_survival`). Computed in chunks of one size; callers with many images call
    this on a part of them at a time (a user's), so memory does not grow with the number of images."""
    n = len(originals)
    if len(marked) != n or len(noise_seeds) != n:
        raise ValueError(f"{n} originals, {len(marked)} marked images and {len(noise_seeds)} noise seeds")
    per_image: dict[str, dict[str, list[np.ndarray]]] = {}
    chunks = [
        chunk for group in shape_groups(originals) for chunk in np.array_split(group, -(-len(group) // SURVIVAL_CHUNK))
    ]
    for chunk in chunks:
        x = np.stack([originals[i] for i in chunk])
        versions = {"raw": np.stack([marked[i] for i in chunk])}
        versions.update({name: np.stack([images[i] for i in chunk]) for name, images in (stored or {}).items()})
        if x.ndim != 4 or x.shape[-1] != 3 or any(v.shape != x.shape for v in versions.values()):
            raise ValueError(f"originals {x.shape[1:]} and their stored versions must all be (H, W, 3) alike")
        versions.update({f"jpeg{q}": jpeg_roundtrip(versions["raw"], q) for q in qualities})
        chunk_patterns = np.stack([patterns[i] for i in chunk])
        for name, parts in _correlations(x, versions, cfg, chunk_patterns, np.asarray(noise_seeds)[chunk]).items():
            for part, corr in parts.items():
                per_image.setdefault(name, {}).setdefault(part, []).append(corr)
    return {name: {part: np.concatenate(corr) for part, corr in parts.items()} for name, parts in per_image.items()}


def summarise_survival(correlations: Sequence[dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """The mean of each version's and part's per-image correlations over every image of the given
    results of `survival_correlations` (None over no defined value), and "n_images"."""
    if not correlations:
        return {"n_images": 0}
    result: dict[str, Any] = {
        name: {part: _mean_defined(np.concatenate([c[name][part] for c in correlations])) for part in parts}
        for name, parts in correlations[0].items()
    }
    result["n_images"] = sum(len(c["raw"]["full"]) for c in correlations)
    return result
