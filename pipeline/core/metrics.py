"""ROC metrics for membership inference, on sklearn's ROC curve.

Scores follow the convention "higher = more likely a member". TPR at FPR <= t is the best TPR among
ROC points whose FPR does not exceed t; with M negatives the smallest non-zero FPR is 1/M, so
every t < 1/M reads the same as t = 0 (the report states that resolution).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

FPR_TARGETS = ("0", "0.0001", "0.001", "0.01")


def roc_metrics(is_member: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC, FPR at the first point reaching TPR = 1, and TPR at each FPR target."""
    is_member = np.asarray(is_member, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if is_member.all() or not is_member.any():
        raise ValueError("roc_metrics needs both members and non-members")
    if not np.isfinite(scores).all():
        raise ValueError("roc_metrics: scores contain NaN or infinity")
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    return {
        "auc": float(roc_auc_score(is_member, scores)),
        "fpr_at_tpr_1": float(fpr[np.argmax(tpr >= 1.0)]),
        "tpr_at_fpr": {t: float(tpr[fpr <= float(t)].max()) for t in FPR_TARGETS},
        "n_members": int(is_member.sum()),
        "n_nonmembers": int((~is_member).sum()),
    }


def roc_points(is_member: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(np.asarray(is_member, dtype=bool), np.asarray(scores, dtype=np.float64))
    return fpr, tpr


def per_user_mean(values: np.ndarray, user_ids: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Mean of `values` over each user's samples, in the order of `users`; every user must have samples."""
    index = {int(u): i for i, u in enumerate(users)}
    rows = np.array([index[int(u)] for u in user_ids])
    counts = np.bincount(rows, minlength=len(users))
    if (counts == 0).any():
        missing = [int(users[i]) for i in np.flatnonzero(counts == 0)[:5]]
        raise ValueError(f"no audit samples for users {missing}")
    return np.bincount(rows, weights=values, minlength=len(users)) / counts


def user_scores(scores: dict[str, np.ndarray], users: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-user set scores (higher = more likely member) in manifest order."""
    ids = np.array([u["user_id"] for u in users])
    return {
        "user_id": ids,
        "is_member": np.array([u["role"] == "member" for u in users]),
        "mean_loss": per_user_mean(scores["loss"].astype(np.float64), scores["user"], ids),
        "mean_margin": per_user_mean(scores["margin"].astype(np.float64), scores["user"], ids),
    }
