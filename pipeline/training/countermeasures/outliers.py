"""Outlier filtering before training (`train.defense.outlier_fraction`): a trainer drops the share
of each class that looks most unusual, hoping to drop marked images with it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F

from ...store import write_json
from .base import Batch, Countermeasure, register


def outlier_scores(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How unusual each image looks for its class: the mean squared z-score of its features
    against its class's per-feature mean and spread (a diagonal Mahalanobis distance)."""
    scores = np.zeros(len(labels))
    for cls in np.unique(labels):
        rows = labels == cls
        mean, std = features[rows].mean(0), features[rows].std(0) + 1e-6
        scores[rows] = (((features[rows] - mean) / std) ** 2).mean(1)
    return scores


def select_inliers(loader: Iterable[Batch], fraction: float, record: Path) -> tuple[np.ndarray, dict[str, int]]:
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
    counts = {
        "dropped": int(dropped.sum()),
        "marked": int(marked.sum()),
        "marked_dropped": int((dropped & marked).sum()),
    }
    write_json(
        record, {"fraction": fraction, **counts, "dropped_sample_ids": sorted(int(i) for i in sample_arr[dropped])}
    )
    return np.flatnonzero(~dropped), counts


@register
class OutlierFilter(Countermeasure):
    fields = ("outlier_fraction",)

    def select(self, records: Callable[[], Iterable[Batch]], record: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
        kept, counts = select_inliers(records(), self.cfg.defense.outlier_fraction, record)
        return kept, {"outliers": counts}
