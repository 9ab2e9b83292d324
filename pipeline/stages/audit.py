"""Stage `audit`: per-sample losses of a trained model on every user's marked images, then ROC.

The model runs in eval mode on the marked images with normalisation only (no augmentation), as the
write stage stored them (the members' records are byte for byte their training records, JPEG
included) and decoded as the model's own evaluation decodes: stored pixels, or for images of
varying size the centre crop at the train config's evaluation resolution.
Losses are computed in fp32 from the logit margin m = z_y - logsumexp_{j != y} z_j as
CE = softplus(-m): the same number as cross-entropy, but it does not round to zero for confident
predictions, so memorised members stay distinguishable from merely easy non-members.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import AuditConfig
from ..console import track
from ..core.metrics import class_breakdown, roc_metrics, user_scores
from ..core.models import load_weights
from ..core.scoring import logit_margin
from ..core.stats import (
    benjamini_hochberg,
    bh_smallest_null_size,
    class_leave_one_out_p_values,
    class_rank_p_values,
    clopper_pearson,
    leave_one_out_p_values,
    null_calibration,
    rank_p_values,
)
from ..data.betons import make_loader
from ..store import Stage, StageError, load_npz, read_json, run_shards, save_npz, write_json
from .contract import Context

SCORE_ARRAYS = ("loss", "margin", "user", "sample", "label")


@torch.no_grad()
def score_samples(
    model: torch.nn.Module,
    beton: Path,
    cfg: AuditConfig,
    device: torch.device,
    indices: np.ndarray | None = None,
    resolution: int | None = None,
    label: str = "scoring",
) -> dict[str, np.ndarray]:
    """Loss and margin of every record in `beton` (or of the records at `indices`), in file order,
    into preallocated arrays; images as stored, or centre-cropped to `resolution` (`image_decoder`)."""
    loader = make_loader(beton, cfg.batch_size, cfg.num_workers, train=False, indices=indices, resolution=resolution)
    n = loader.num_samples
    out = {
        "loss": np.empty(n, np.float32),
        "margin": np.empty(n, np.float32),
        "user": np.empty(n, np.int64),
        "sample": np.empty(n, np.int64),
        "label": np.empty(n, np.int64),
    }
    model.eval().to(device)
    pos = 0
    for images, labels, samples, users in track(loader, label, len(loader), "batches"):
        margin = logit_margin(model(images.to(device, non_blocking=True)), labels.to(device))
        end = pos + len(labels)
        out["margin"][pos:end] = margin.cpu().numpy()
        out["loss"][pos:end] = torch.nn.functional.softplus(-margin).cpu().numpy()
        out["user"][pos:end], out["sample"][pos:end], out["label"][pos:end] = users, samples, labels
        pos = end
    if pos != n:
        raise StageError(f"{beton}: scored {pos} of {n} records")
    return out


def _bh_decisions(p_members: np.ndarray, p_audited: np.ndarray, fdr_levels: tuple[float, ...]) -> dict[str, Any]:
    """Benjamini–Hochberg over the member users and the audited non-member users, at each level."""
    out = {}
    for q in fdr_levels:
        reject = benjamini_hochberg(np.concatenate([p_members, p_audited]), q)
        flagged_members, flagged_null = int(reject[: len(p_members)].sum()), int(reject[len(p_members) :].sum())
        out[str(q)] = {
            "members_flagged": flagged_members,
            "nonmembers_flagged": flagged_null,
            "false_discovery_proportion": flagged_null / max(flagged_members + flagged_null, 1),
            "smallest_null_size": bh_smallest_null_size(len(p_members), len(p_members) + len(p_audited), q),
        }
    return out


def user_p_values(is_member: np.ndarray, score: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every user's exact rank p-value, among all non-member users (pooled) and among those of its
    class: a member's against them, a non-member's leave-one-out against the others (what a
    never-trained-on user would get)."""
    null, null_classes = score[~is_member], classes[~is_member]
    pooled, by_class = np.empty(len(score)), np.empty(len(score))
    pooled[is_member], pooled[~is_member] = rank_p_values(score[is_member], null), leave_one_out_p_values(null)
    by_class[is_member] = class_rank_p_values(score[is_member], classes[is_member], null, null_classes)
    by_class[~is_member] = class_leave_one_out_p_values(null, null_classes)
    return pooled, by_class


def user_table(scores: dict[str, np.ndarray], users: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """`users.npz`: per user in manifest order, the set score (mean loss, and the logit margin beside
    it), the class and both p-values; what the report and W&B show, computed here once."""
    per_user = user_scores(scores, users)
    classes = np.array([u["class"] for u in users], dtype=np.int64)
    pooled, by_class = user_p_values(per_user["is_member"], -per_user["mean_loss"], classes)
    return {**per_user, "class": classes, "p_value": pooled, "class_p_value": by_class}


def user_statistics(
    table: dict[str, np.ndarray],
    fdr_nonmembers: int,
    fdr_levels: tuple[float, ...] = (0.05, 0.1),
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Per member user the exact rank p-value among the non-member users (pooled) and among those of
    its class only (`class_conditional`); Clopper-Pearson intervals on TPR at FPR = 0 and on FPR at
    TPR = 1; Benjamini-Hochberg decisions over the member users and the first `fdr_nonmembers`
    non-member users (each with its leave-one-out p-value, as a never-trained-on user would get), with
    the smallest M at which BH could flag every member; and per class, the share of non-member users
    with leave-one-out p <= 0.05, which a calibrated null keeps inside its binomial limits."""
    is_member, score, classes = table["is_member"], -table["mean_loss"], table["class"]
    member_scores, null = score[is_member], score[~is_member]
    member_classes, null_classes = classes[is_member], classes[~is_member]
    p_members, p_null = table["p_value"][is_member], table["p_value"][~is_member]
    c_members, c_null = table["class_p_value"][is_member], table["class_p_value"][~is_member]
    audited = min(fdr_nonmembers, len(null))
    detected = int((member_scores > null.max()).sum())
    above_worst_member = int((null >= member_scores.min()).sum())
    null_per_class = {int(c): int((null_classes == c).sum()) for c in np.unique(classes)}
    return {
        "member_p_values": p_members.tolist(),
        "smallest_possible_p_value": 1.0 / (len(null) + 1),
        "tpr_at_fpr_0": {
            "value": detected / len(member_scores),
            "interval": clopper_pearson(detected, len(member_scores), confidence),
        },
        "fpr_at_tpr_1": {
            "value": above_worst_member / len(null),
            "interval": clopper_pearson(above_worst_member, len(null), confidence),
        },
        "confidence": confidence,
        "fdr_hypotheses": {"members": len(p_members), "nonmembers": audited},
        "benjamini_hochberg": _bh_decisions(p_members, p_null[:audited], fdr_levels),
        "null_calibration": null_calibration(p_null, null_classes),
        "class_conditional": {
            "member_p_values": c_members.tolist(),
            "smallest_possible_p_values": [1.0 / (null_per_class[int(c)] + 1) for c in member_classes],
            "benjamini_hochberg": _bh_decisions(c_members, c_null[:audited], fdr_levels),
            "null_calibration": null_calibration(c_null, null_classes),
        },
    }


def audit_metrics(scores: dict[str, np.ndarray], table: dict[str, np.ndarray], fdr_nonmembers: int) -> dict[str, Any]:
    """The audit's numbers: ROC metrics set-based (also on the logit margin) and instance-based, the
    statistics of `user_statistics`, the mean losses, and where false positives come from by class."""
    is_member, loss = table["is_member"], table["mean_loss"]
    sample_is_member = np.isin(scores["user"], table["user_id"][is_member])
    statistics = user_statistics(table, fdr_nonmembers)
    return {
        "set_based": roc_metrics(is_member, -loss),
        "instance_based": roc_metrics(sample_is_member, -scores["loss"].astype(np.float64)),
        "set_based_logit": roc_metrics(is_member, table["mean_margin"]),
        "statistics": statistics,
        "member_mean_loss": float(loss[is_member].mean()),
        "nonmember_mean_loss": float(loss[~is_member].mean()),
        **class_breakdown(table, table["class"], statistics),
    }


def pick_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")


def process_group() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process among those a launcher started for one task
    (torchrun, or srun with several tasks); (0, 1, 0) when it runs alone."""
    env = os.environ
    world = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)
    rank = int(env.get("RANK") or env.get("SLURM_PROCID") or 0)
    return rank, world, int(env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or 0)


def shard_records(users: list[dict[str, Any]], shard: int, num_shards: int) -> np.ndarray:
    """Record positions in audit.beton of users shard, shard + num_shards, ...: the beton holds every
    user's samples contiguously, in manifest order (see the write stage)."""
    ends = np.cumsum([len(u["sample_ids"]) for u in users])
    starts = ends - np.array([len(u["sample_ids"]) for u in users])
    return np.concatenate(
        [np.arange(starts[i], ends[i]) for i in range(shard, len(users), num_shards)] or [np.zeros(0, np.int64)]
    )


def merge_scores(stage: Stage, names: list[str], users: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate shard scores and check that every user's every sample was scored exactly once."""
    shards = [load_npz(stage.path(n)) for n in names]
    scores = {k: np.concatenate([s[k] for s in shards]) for k in SCORE_ARRAYS}
    scored = sorted(zip(scores["user"].tolist(), scores["sample"].tolist()))
    expected = sorted((u["user_id"], sid) for u in users for sid in u["sample_ids"])
    if scored != expected:
        missing, extra = set(expected) - set(scored), len(scored) - len(set(scored))
        raise StageError(
            f"{stage.dir}: shards do not cover the plan exactly once "
            f"({len(missing)} (user, sample) pairs missing, {extra} scored twice)"
        )
    return scores


def run_audit(ctx: Context) -> None:
    """Score the missing shards of users (or only the task's shard), then merge, check and summarise;
    images decoded at the model's evaluation resolution (recorded with its weights; none: as stored).

    Run as several processes (one per GPU), each process scores its own part of every shard: shard
    s of n becomes parts s*W + r of n*W for ranks r < W, split by whole users. Nothing is padded to
    equal length, as a DistributedSampler would, so no sample can enter a user's mean twice; the
    process that finishes the last part merges and checks that every sample was scored once."""
    stage, cfg, num_shards, only_shard = ctx.stage, ctx.config.audit, ctx.task.num_shards, ctx.task.shard
    users, audit_beton, weights = read_json(ctx.input("users"))["users"], ctx.input("audit_set"), ctx.input("model")
    rank, world, local_rank = process_group()
    device, loaded = pick_device(local_rank), None
    parts, mine = (
        num_shards * world,
        [s * world + rank for s in (range(num_shards) if only_shard is None else [only_shard])],
    )

    def score_shard(shard: int, path: Path) -> None:
        nonlocal loaded
        records = shard_records(users, shard, parts)
        if len(records) == 0:  # more shards than users
            save_npz(
                path, **{k: np.zeros(0, np.float32 if k in ("loss", "margin") else np.int64) for k in SCORE_ARRAYS}
            )
            return
        loaded = loaded or load_weights(weights)
        model, meta = loaded
        save_npz(
            path, **score_samples(model, audit_beton, cfg, device, records, meta.get("eval_resolution"), stage.name)
        )

    names = run_shards(stage, parts, mine, score_shard)
    if names is None:
        return
    scores = merge_scores(stage, names, users)
    table = user_table(scores, users)
    save_npz(stage.path("losses.npz"), **scores)
    save_npz(stage.path("users.npz"), **table)
    write_json(stage.path("metrics.json"), audit_metrics(scores, table, cfg.fdr_nonmembers))
    stage.finish(["losses.npz", "users.npz", "metrics.json", *names])
