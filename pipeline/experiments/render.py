"""A finished table as people read it: `results/<table>/README.md` (mean and interval per row, the
difference from the baseline, then every seed's run), `spread.png` (one marker per seed), and the
table's entry in `results/README.md`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..store import atomic_path, write_text  # noqa: E402
from .summary import HEADLINE, INTERVAL, effects  # noqa: E402
from .tables import Table  # noqa: E402

LABELS = {
    "auc": "AUC",
    "fpr_at_tpr_1": "FPR @ 100% TPR",
    "tpr_at_fpr_below_0.001": "TPR @ FPR < 1e-3",
    "test_accuracy": "test acc",
}
OVERVIEW_HEADER = (
    "# Experiment results\n\nEach table regenerates with `make experiments` (or `mtrack experiments <table yaml>`); "
    "the paper's claim is stated next to ours. Every row is repeated over seeds (each seed draws other users, images "
    f"and patterns and trains another model); numbers are means with a {INTERVAL}, and each row is compared with "
    "its table's baseline row by the differences paired by seed: an effect *stands out from seed noise* when the "
    "95% interval of that difference excludes 0 (per row and number, not corrected for the many comparisons).\n"
)


def _num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _spec(key: str) -> str:
    return ".2f" if key.startswith("tpr") else ".3f"


def with_interval(row: dict[str, Any], key: str) -> str:
    """`mean [lo, hi]` of a row's number (the mean alone with one seed)."""
    mean, bounds, spec = row["mean"][key], row["interval"][key], _spec(key)
    if mean is None:
        return "—"
    return format(mean, spec) + ("" if bounds is None else f" [{bounds[0]:{spec}}, {bounds[1]:{spec}}]")


def difference(row: dict[str, Any], key: str) -> str:
    """The difference from the baseline with its interval, bold when it stands out from seed noise."""
    if "vs_baseline" not in row:
        return "baseline"
    d = row["vs_baseline"][key]
    if d is None:
        return "—"
    spec = "+" + _spec(key)
    text = f"{d['difference']:{spec}} [{d['interval'][0]:{spec}}, {d['interval'][1]:{spec}}]"
    return f"**{text}**" if d["beyond_noise"] else text


def row_notes(run: dict[str, Any]) -> str:
    """What a countermeasure did, the member users' classes and the classes of the non-member users
    scoring below the worst member (where the report says)."""
    notes = [run.get("notes", "")]
    if run.get("member_classes"):
        notes.append("members: " + ", ".join(run["member_classes"]))
    if run.get("false_positives_by_class"):
        notes.append(
            "below the worst member: " + ", ".join(f"{c} {n}" for c, n in run["false_positives_by_class"].items())
        )
    return "; ".join(n for n in notes if n)


def markdown(table: Table, rows: list[dict[str, Any]], means: list[dict[str, Any]]) -> str:
    baseline = table.baseline_row.name
    m = min(row["n_nonmember_users"] for row in rows)
    head = (
        "| variant | seeds | "
        + " | ".join(LABELS[k] for k in HEADLINE)
        + " | "
        + " | ".join(f"Δ {LABELS[k]}" for k in HEADLINE)
        + " |\n"
        + "|---" * (2 + 2 * len(HEADLINE))
        + "|\n"
    )
    lines = [
        f"| {r['name']} | {r['n_seeds']} | "
        + " | ".join(with_interval(r, k) for k in HEADLINE)
        + " | "
        + " | ".join(difference(r, k) for k in HEADLINE)
        + " |"
        for r in rows
    ]
    text = (
        f"# {table.title}\n\nPaper: {table.claim}\n\nBase config `{table.base}`"
        f"{f' with {json.dumps(table.set)}' if table.set else ''}; "
        f"set-based audit of the marked model against M = {m:,} non-member users (FPR resolved to 1/M; "
        "TPR @ FPR < t counts false positives strictly below t, as the official code does). Each cell: mean "
        f"over the row's seeds [{INTERVAL}]; Δ: difference from the baseline row *{baseline}*, paired by "
        "seed [95% t-interval]; **bold** where that interval excludes 0 (the effect stands out from seed "
        f"noise). Figure: [spread.png](spread.png). Regenerate: `mtrack experiments "
        f"configs/experiments/{table.table}.yaml`.\n\n" + head + "\n".join(lines) + "\n"
    )
    if means:
        text += (
            "\n| mean over | runs | "
            + " | ".join(LABELS[k] for k in HEADLINE)
            + " |\n"
            + "|---" * (2 + len(HEADLINE))
            + "|\n"
        )
        text += (
            "\n".join(
                f"| {g['name']} | {g['n_runs']} | " + " | ".join(with_interval(g, k) for k in HEADLINE) + " |"
                for g in means
            )
            + "\n"
        )
    text += (
        "\n## Every run\n\n| variant | seed | AUC | FPR @ 100% TPR (95% CI) | TPR @ FPR 0 (95% CI) | "
        "TPR @ FPR < 1e-3 / < 1e-4 | max member p: pooled / own class | instance AUC | control AUC | train loss | "
        "test acc | PSNR dB | notes |\n" + "|---" * 13 + "|\n"
    )
    text += "\n".join(
        f"| {r['name']} | {run['seed']} | {run['auc']:.3f} | {run['fpr_at_tpr_1']:.3f} "
        f"({run['fpr_at_tpr_1_interval'][0]:.3f}–"
        f"{run['fpr_at_tpr_1_interval'][1]:.3f}) | {run['tpr_at_fpr_0']:.2f} ({run['tpr_at_fpr_0_interval'][0]:.2f}–"
        f"{run['tpr_at_fpr_0_interval'][1]:.2f}) | {_num(run.get('tpr_at_fpr_below_0.001'), '.2f')} / "
        f"{_num(run.get('tpr_at_fpr_below_0.0001'), '.2f')} | {run['largest_member_p_value']:.3g} / "
        f"{_num(run.get('largest_class_conditional_p_value'), '.3g')} | {run['instance_auc']:.3f} | "
        f"{_num(run.get('control_auc'), '.3f')} | {run['train_loss']:.2g} | {run['test_accuracy']:.3f} | "
        f"{run['psnr']:.1f} | {row_notes(run)} |"
        for r in rows
        for run in r["runs"]
    )
    return text + "\n"


def effects_sentences(rows: list[dict[str, Any]], baseline: str) -> str:
    """Which rows stand out from seed noise against the baseline, in words."""
    beyond, within, unknown = effects(rows)
    by_name = {row["name"]: row for row in rows}
    parts = []
    if beyond:
        parts.append(
            f"Standing out from seed noise against *{baseline}*: "
            + "; ".join(
                f"{name} ({', '.join(f'{LABELS[k]} {difference(by_name[name], k)}'.replace('**', '') for k in keys)})"
                for name, keys in beyond
            )
            + "."
        )
    if within:
        parts.append("Within seed noise of the baseline: " + ", ".join(within) + ".")
    if unknown:
        parts.append("Too few common seeds to compare: " + ", ".join(unknown) + ".")
    return " ".join(parts)


def update_overview(results: Path, table: Table, rows: list[dict[str, Any]], means: list[dict[str, Any]]) -> None:
    """The table's entry in results/README.md: the paper's claim, ours per row with its spread, and
    which rows differ from the baseline beyond seed noise."""
    readme = results / "README.md"
    text = readme.read_text() if readme.exists() else OVERVIEW_HEADER
    sections = [part for part in text.split("\n## ") if part.strip()]
    entries = {part.split("\n", 1)[0]: part for part in sections[1:]}
    m = min(row["n_nonmember_users"] for row in rows)
    entry = (
        f"{table.title}\n\nPaper: {table.claim}. Ours ([table]({table.table}/README.md), "
        f"[figure]({table.table}/spread.png); M = {m:,} non-member users; mean [95% t-interval] over seeds):\n\n"
    )
    entry += (
        "\n".join(
            f"- {r['name']} ({r['n_seeds']} seeds): "
            + ", ".join(f"{LABELS[k]} {with_interval(r, k)}" for k in HEADLINE)
            for r in rows
        )
        + "\n"
    )
    entry += "".join(
        f"- mean over {g['name']} ({g['n_runs']} runs): "
        + ", ".join(f"{LABELS[k]} {with_interval(g, k)}" for k in HEADLINE)
        + "\n"
        for g in means
    )
    if sentences := effects_sentences(rows, table.baseline_row.name):
        entry += "\n" + sentences + "\n"
    entries[table.title] = entry
    write_text(readme, overview_header(entries) + "".join(f"\n## {entries[title]}" for title in sorted(entries)))


SINGLE_RUN_MARK = "Ours ("  # how a table's entry began before tables were repeated over seeds


def overview_header(entries: dict[str, str]) -> str:
    """The overview's first paragraph, naming the tables still made by one run before seeds were a
    dimension, so no reader takes their row differences for effects."""
    single = [title for title, entry in entries.items() if SINGLE_RUN_MARK in entry and "over seeds):" not in entry]
    if not single:
        return OVERVIEW_HEADER
    return OVERVIEW_HEADER + (
        "\nNot yet regenerated, so still **one run (one seed) with M = 300 non-member users** (its differences "
        "between rows are not tested against seed noise, which for the demo setting alone spans AUC 0.94–0.98 "
        "over five seeds): " + "; ".join(f"*{title}*" for title in sorted(single)) + ".\n"
    )


def plot_spread(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """AUC and FPR @ 100% TPR per row: every seed's run as a dot, the mean with its interval as a bar."""
    keys = ("auc", "fpr_at_tpr_1")
    fig, axes = plt.subplots(1, len(keys), figsize=(10, 0.45 * len(rows) + 1.6), sharey=True)
    positions = list(range(len(rows)))[::-1]
    for ax, key in zip(axes, keys):
        for y, row in zip(positions, rows):
            ax.scatter([run[key] for run in row["runs"]], [y] * len(row["runs"]), s=14, color="tab:gray", zorder=2)
            mean, bounds = row["mean"][key], row["interval"][key]
            if bounds is not None:
                ax.errorbar(
                    mean,
                    y,
                    xerr=[[mean - bounds[0]], [bounds[1] - mean]],
                    fmt="none",
                    ecolor="tab:blue",
                    capsize=4,
                    zorder=3,
                )
            ax.plot([mean], [y], "D", color="tab:blue", zorder=4)
        ax.set_xlabel(LABELS[key])
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, [f"{row['name']} ({row['n_seeds']})" for row in rows])
    fig.suptitle(f"{title}\nmean and 95% t-interval over seeds (dots: one run each)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
