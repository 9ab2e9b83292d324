"""Weights & Biases: one run per stage (`job_type` = the stage), grouped by experiment, offline unless
the config says otherwise.

Training logs through Lightning's `WandbLogger`; every other stage is published here from the files
it wrote, once it has finished, so stage code knows nothing of W&B and the numbers on the dashboard
are exactly those on disk. Run ids are fixed by the stage folder and config hash: a re-run or a
requeued job continues the same run instead of starting a second one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..store import Stage, load_npz, read_json
from .contract import Context


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as `a/b/c` keys (W&B summary and charts want flat scalars)."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def _audit_tables(wandb: Any, stage: Stage, users: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-user verdicts as a table, the ROC over users, and the member users' p-values."""
    from ..core.metrics import roc_points, user_scores
    from ..core.stats import leave_one_out_p_values, rank_p_values

    per_user = user_scores(load_npz(stage.path("losses.npz")), users)
    member, score = per_user["is_member"], -per_user["mean_loss"]
    p_values = np.empty(len(score))
    p_values[member] = rank_p_values(score[member], score[~member])
    p_values[~member] = leave_one_out_p_values(score[~member])
    table = wandb.Table(
        columns=["user_id", "role", "class", "mean_loss", "p_value"],
        data=[
            [u["user_id"], u["role"], u["class"], float(loss), float(p)]
            for u, loss, p in zip(users, per_user["mean_loss"], p_values)
        ],
    )
    fpr, tpr = roc_points(member, score)
    roc = wandb.Table(columns=["fpr", "tpr"], data=[[float(f), float(t)] for f, t in zip(fpr, tpr)])
    return {
        "users": table,
        "roc": wandb.plot.line(roc, "fpr", "tpr", title=f"{stage.name}: ROC over users (set-based)"),
        "member_p_values": wandb.Histogram(p_values[member].tolist()),
    }


def publish(ctx: Context) -> None:
    """Log a finished stage to W&B: its manifest's numbers, the numbers of its `metrics.json` and its
    plots (whatever of these its contract says it writes), and for an audit the per-user table, ROC
    and p-values."""
    import wandb

    stage, spec = ctx.stage, ctx.task.spec
    manifest = stage.manifest()
    summary = flatten({k: v for k, v in manifest.items() if k not in ("outputs", "sizes", "config_hash")})
    outputs = [name for name in manifest.get("outputs", {}) if spec.declares(name)]
    logged: dict[str, Any] = {}
    if "metrics.json" in outputs:
        summary.update(flatten(read_json(stage.path("metrics.json"))))
    logged.update({Path(name).stem: wandb.Image(str(stage.path(name))) for name in outputs if name.endswith(".png")})
    if spec.name == "audit":
        logged.update(_audit_tables(wandb, stage, read_json(ctx.input("users"))["users"]))
    run = wandb.init(
        project=ctx.tracking.project,
        group=ctx.experiment,
        job_type=spec.name,
        name=f"{ctx.experiment}/{stage.name}",
        id=stage.tracking_id,
        resume="allow",
        dir=str(stage.dir),
        mode=ctx.tracking.mode,
        config={"stage": stage.name, "config_hash": stage.config_hash},
    )
    try:
        if logged:
            run.log(logged)
        run.summary.update(summary)
    finally:
        run.finish()
