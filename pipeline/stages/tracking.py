"""Weights & Biases: one run per stage (`job_type` = the stage), grouped by experiment (or by the
`wandb.group` an experiment table sets), offline unless the config says otherwise.

Training logs through Lightning's `WandbLogger`; every other stage is published here from the files
it wrote, once it has finished, so stage code knows nothing of W&B and the numbers on the dashboard
are exactly those on disk. Every run carries its stage's declared config as dotted keys and the
run's labels (an experiment table's table, row and seed), so a dashboard can group and filter runs
by any setting. Run ids are fixed by the stage folder and config hash: a re-run or a requeued job
continues the same run instead of starting a second one; `publish_run` (`mtrack publish`) publishes
a run that finished while W&B was off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..store import Stage, load_npz, read_json
from .contract import Context, context, stage_for, tasks


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


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of nested dicts as `a.b.c` keys, as the config is written (`train.defense.mix`)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_config(ctx: Context) -> dict[str, Any]:
    """What a stage's W&B run records as its config, for a dashboard to group, filter and compare
    runs by: the config its outputs depend on (its own and every upstream stage's; a report's run thus
    has the training and marking settings) as dotted keys, defaults included, the stage, its config
    hash, the run's name and its labels (an experiment table's table, row and seed)."""
    return {
        **dotted(ctx.settings),
        "stage": ctx.stage.name,
        "config_hash": ctx.stage.config_hash,
        "run": ctx.experiment,
        **ctx.tracking.labels,
    }


def run_name(ctx: Context) -> str:
    """`<group>/<labels...>/<stage>`, e.g. `countermeasures/MixUp (alpha 1)/1/train-marked`."""
    return "/".join(
        [ctx.tracking.group or ctx.experiment, *(str(v) for v in ctx.tracking.labels.values()), ctx.stage.name]
    )


def _audit_tables(wandb: Any, stage: Stage, users: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-user verdicts as a table, the ROC over users, and the member users' p-values, as the
    audit stage computed them (`users.npz`)."""
    from ..core.metrics import roc_points

    table = load_npz(stage.path("users.npz"))
    member = table["is_member"]
    rows = wandb.Table(
        columns=["user_id", "role", "class", "mean_loss", "p_value", "class_p_value"],
        data=[
            [u["user_id"], u["role"], u["class"], float(loss), float(p), float(cp)]
            for u, loss, p, cp in zip(users, table["mean_loss"], table["p_value"], table["class_p_value"])
        ],
    )
    fpr, tpr = roc_points(member, -table["mean_loss"])
    roc = wandb.Table(columns=["fpr", "tpr"], data=[[float(f), float(t)] for f, t in zip(fpr, tpr)])
    return {
        "users": rows,
        "roc": wandb.plot.line(roc, "fpr", "tpr", title=f"{stage.name}: ROC over users (set-based)"),
        "member_p_values": wandb.Histogram(table["p_value"][member].tolist()),
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
        group=ctx.tracking.group or ctx.experiment,
        job_type=spec.name,
        name=run_name(ctx),
        id=stage.tracking_id,
        resume="allow",
        dir=str(stage.dir),
        mode=ctx.tracking.mode,
        config=run_config(ctx),
    )
    try:
        if logged:
            run.log(logged)
        run.summary.update(summary)
    finally:
        run.finish()


def publish_run(cfg: RunConfig) -> list[str]:
    """Publish every finished stage of a run to W&B after the fact (W&B switched on once the run was
    done: its stages are skipped, so nothing else publishes them); returns the stages published.
    Training's per-step curves are only logged live; published later it shows its final metrics."""
    published = []
    for task in tasks(cfg):
        if stage_for(cfg, task).done():
            publish(context(cfg, task))
            published.append(task.name)
    return published
