"""What a table row says over its seeds: each run's numbers (from its report), their mean and 95%
Student-t interval, and the row's difference from the table's baseline row paired by seed, with
whether that difference stands out from seed noise (its interval excludes 0)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.stats import paired_difference, t_interval

# The numbers every table gives with their spread over seeds; HEADLINE ones are also compared with
# the baseline row. None where a run's report predates the number (or the run has no control arm).
SPREAD = (
    "auc",
    "fpr_at_tpr_1",
    "tpr_at_fpr_0",
    "tpr_at_fpr_below_0.001",
    "tpr_at_fpr_below_0.0001",
    "largest_member_p_value",
    "largest_class_conditional_p_value",
    "instance_auc",
    "control_auc",
    "train_loss",
    "test_accuracy",
    "psnr",
)
HEADLINE = ("auc", "fpr_at_tpr_1", "tpr_at_fpr_below_0.001", "test_accuracy")
INTERVAL = "95% Student-t interval over seeds (cut to the range a number can take)"
# The range each number cannot leave: intervals are cut to it (rates, AUCs, p-values, accuracy in
# [0, 1]; a loss is not negative); PSNR has none.
RANGE = {key: (0.0, 1.0) for key in SPREAD if key not in ("train_loss", "psnr")} | {"train_loss": (0.0, math.inf)}


def run_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a table reports for one run, from its report's metrics.json."""
    stats, training = metrics["statistics"], metrics["training"]["marked"]
    below = metrics["set_based"].get("tpr_at_fpr_below", {})
    return {
        "auc": metrics["set_based"]["auc"],
        "fpr_at_tpr_1": metrics["set_based"]["fpr_at_tpr_1"],
        "fpr_at_tpr_1_interval": stats["fpr_at_tpr_1"]["interval"],
        "tpr_at_fpr_0": stats["tpr_at_fpr_0"]["value"],
        "tpr_at_fpr_0_interval": stats["tpr_at_fpr_0"]["interval"],
        "tpr_at_fpr_below_0.001": below.get("0.001"),
        "tpr_at_fpr_below_0.0001": below.get("0.0001"),
        "largest_member_p_value": max(stats["member_p_values"]),
        "largest_class_conditional_p_value": max(stats["class_conditional"]["member_p_values"])
        if "class_conditional" in stats
        else None,
        "smallest_possible_p_value": stats["smallest_possible_p_value"],
        "n_nonmember_users": metrics["set_based"]["n_nonmembers"],
        "instance_auc": metrics["instance_based"]["auc"],
        "control_auc": (metrics.get("control_unmarked") or {}).get("auc"),
        "train_loss": training["train_loss"],
        "test_accuracy": training["test_accuracy"],
        "psnr": metrics["mark_quality"]["member"]["psnr_mean"],
        "member_classes": sorted({row["class"] for row in metrics.get("per_member", [])}),
        "false_positives_by_class": {
            name: row["nonmembers_below_worst_member"]
            for name, row in metrics.get("per_class", {}).items()
            if row["nonmembers_below_worst_member"]
        },
    }


def spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and interval of each SPREAD number over `runs` (None where a run lacks it)."""
    mean, interval = {}, {}
    for key in SPREAD:
        values = [run.get(key) for run in runs]
        ok = None not in values and bool(values)
        mean[key] = float(np.mean(values)) if ok else None
        bounds = t_interval(values, within=RANGE.get(key)) if ok else None  # type: ignore[arg-type]
        interval[key] = None if bounds is None else list(bounds)
    return {"mean": mean, "interval": interval}


def _span(key: str) -> float:
    """How far apart two values of `key` can lie: the most a difference of them can be."""
    low, high = RANGE.get(key, (-math.inf, math.inf))
    return high - low


def by_seed(runs: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {run["seed"]: run[key] for run in runs if run.get(key) is not None}


def summarise(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each row ({name, set, runs}) with its seeds, M, spread and (but for the baseline) its
    difference from the baseline row per HEADLINE number."""
    base = next(row for row in rows if row["name"] == baseline)
    out = []
    for row in rows:
        runs = row["runs"]
        entry = {
            **row,
            "seeds": [run["seed"] for run in runs],
            "n_seeds": len(runs),
            "n_nonmember_users": min(run["n_nonmember_users"] for run in runs),
            **spread(runs),
        }
        if row is not base:
            entry["vs_baseline"] = {
                key: paired_difference(by_seed(runs, key), by_seed(base["runs"], key), span=_span(key))
                for key in HEADLINE
            }
        out.append(entry)
    return out


def group_means(averages: dict[str, list[str]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each averaged group of rows (e.g. single-target runs over target classes): the spread over
    every run of its rows."""
    by_name = {row["name"]: row for row in rows}
    return [
        {
            "name": name,
            "rows": len(members),
            "n_runs": sum(len(by_name[m]["runs"]) for m in members),
            **spread([run for m in members for run in by_name[m]["runs"]]),
        }
        for name, members in averages.items()
    ]


def effects(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, list[str]]], list[str], list[str]]:
    """Rows whose difference from the baseline stands out from seed noise in some HEADLINE number
    (with those numbers), rows where none does, and rows with too few common seeds to tell."""
    beyond, within, unknown = [], [], []
    for row in rows:
        if "vs_baseline" not in row:
            continue
        compared = {key: d for key, d in row["vs_baseline"].items() if d is not None}
        if not compared:
            unknown.append(row["name"])
        elif keys := [key for key, d in compared.items() if d["beyond_noise"]]:
            beyond.append((row["name"], keys))
        else:
            within.append(row["name"])
    return beyond, within, unknown
