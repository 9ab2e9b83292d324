"""ROC metrics for membership inference, on sklearn's ROC curve.

Scores follow the convention "higher = more likely a member". Two conventions for TPR at a low
FPR, both reported and always named: `tpr_at_fpr_below` (FPR < t, the official code's strict one,
the paper's numbers) and `tpr_at_fpr` (FPR <= t). At t = k/M with M negatives, <= allows one more
false positive than <. With M negatives the smallest non-zero FPR is 1/M, so every t <= 1/M reads
as FPR = 0 under < (t < 1/M under <=); the report states that resolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

FPR_TARGETS = ("0", "0.0001", "0.001", "0.01")  # FPR <= t
STRICT_FPR_TARGETS = ("0.0001", "0.001", "0.01")  # FPR < t (TPR at FPR = 0 is the "0" entry above)


def roc_metrics(is_member: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC, FPR at the first point reaching TPR = 1, and TPR at each FPR target (<= and <)."""
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
        "tpr_at_fpr_below": {t: float(tpr[fpr < float(t)].max()) for t in STRICT_FPR_TARGETS},
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


def class_breakdown(per_user: dict[str, np.ndarray], classes: np.ndarray, statistics: dict[str, Any]) -> dict[str, Any]:
    """Where the false positives come from, per class: how many non-member users score at least as
    member-like (mean loss no higher) as the worst member and as each member, and the mean of the
    members' and non-members' per-user mean loss."""
    loss, member = per_user["mean_loss"], per_user["is_member"]
    worst = loss[member].max()
    per_class = {}
    for c in np.unique(classes):
        mine = classes == c
        per_class[str(c)] = {
            "n_member_users": int((mine & member).sum()),
            "n_nonmember_users": int((mine & ~member).sum()),
            "nonmembers_below_worst_member": int((mine & ~member & (loss <= worst)).sum()),
            "member_mean_loss": float(loss[mine & member].mean()) if (mine & member).any() else None,
            "nonmember_mean_loss": float(loss[mine & ~member].mean()) if (mine & ~member).any() else None,
        }
    null_loss, null_classes = loss[~member], classes[~member]
    per_member = [
        {
            "user_id": int(uid),
            "class": int(c),
            "mean_loss": float(mean_loss),
            "p_value": p,
            "class_p_value": cp,
            "nonmembers_below": {
                str(k): int(((null_classes == k) & (null_loss <= mean_loss)).sum()) for k in np.unique(classes)
            },
        }
        for uid, c, mean_loss, p, cp in zip(
            per_user["user_id"][member],
            classes[member],
            loss[member],
            statistics["member_p_values"],
            statistics["class_conditional"]["member_p_values"],
        )
    ]
    return {"per_class": per_class, "per_member": per_member}
