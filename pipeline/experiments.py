"""Experiment tables: one YAML per table under `configs/experiments/`, each naming a base run config,
overrides common to all rows, and one row per variant. Every row is a whole pipeline run (through
either launcher, each row in its own run directory, so a re-run skips finished rows); the table's
numbers go to `results/<table>/results.json` and `README.md`, and `results/README.md` lists every
table with the paper's claim next to what we measured.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .config import ConfigError, RunConfig, load_config
from .launchers import launch
from .stages.contract import output_path
from .store import read_json, write_json, write_text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Row(_Strict):
    name: str
    set: dict[str, Any] = {}  # dotted config keys -> values, on top of the table's


class Table(_Strict):
    table: str  # folder name under results/ and runs/experiments/
    title: str
    base: str  # run config the rows start from, relative to this file
    claim: str  # what the paper says this table should show
    set: dict[str, Any] = {}
    rows: list[Row]
    averages: dict[str, list[str]] = {}  # name -> rows averaged into one line (e.g. repeated runs)

    @model_validator(mode="after")
    def _averaged_rows_exist(self) -> "Table":
        names = {row.name for row in self.rows}
        for name, members in self.averages.items():
            if missing := [m for m in members if m not in names]:
                raise ValueError(f"averages '{name}': no row named {missing[0]!r}")
        return self


def load_table(path: Path) -> Table:
    try:
        return Table.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"{path}: experiment table not found") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def run_folder(base: str, settings: dict[str, Any]) -> str:
    """Where a row runs, named by what it runs: rows of different tables with the same settings
    share one run, so the second table finds it done."""
    key = json.dumps({"base": Path(base).name, "set": settings}, sort_keys=True)
    return f"runs/experiments/{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def row_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a table reports for one run, from its report's metrics.json."""
    stats, training = metrics["statistics"], metrics["training"]["marked"]
    return {
        "auc": metrics["set_based"]["auc"],
        "fpr_at_tpr_1": metrics["set_based"]["fpr_at_tpr_1"],
        "fpr_at_tpr_1_interval": stats["fpr_at_tpr_1"]["interval"],
        "tpr_at_fpr_0": stats["tpr_at_fpr_0"]["value"],
        "tpr_at_fpr_0_interval": stats["tpr_at_fpr_0"]["interval"],
        "largest_member_p_value": max(stats["member_p_values"]),
        "smallest_possible_p_value": stats["smallest_possible_p_value"],
        "instance_auc": metrics["instance_based"]["auc"],
        "train_loss": training["train_loss"],
        "test_accuracy": training["test_accuracy"],
        "psnr": metrics["mark_quality"]["member"]["psnr_mean"],
        # absent from reports made before these were measured
        **{f"tpr_at_fpr_below_{t}": metrics["set_based"].get("tpr_at_fpr_below", {}).get(t) for t in ("0.001", "0.0001")},
        "largest_class_conditional_p_value": max(stats["class_conditional"]["member_p_values"])
        if "class_conditional" in stats else None,
        "member_classes": sorted({row["class"] for row in metrics.get("per_member", [])}),
        "false_positives_by_class": {name: row["nonmembers_below_worst_member"]
                                     for name, row in metrics.get("per_class", {}).items()
                                     if row["nonmembers_below_worst_member"]},
    }


def defense_notes(training: dict[str, Any]) -> str:
    """What a countermeasure did, from the train stage's metrics (empty when none was on)."""
    notes = []
    if "dp_epsilon" in training:
        notes.append(f"DP epsilon {training['dp_epsilon']:.3g}")
    if "sparsity" in training:
        notes.append(f"{100 * training['sparsity']:.0f}% of weights zero")
    if "outliers" in training:
        o = training["outliers"]
        notes.append(f"filter dropped {o['dropped']} images, {o['marked_dropped']} of {o['marked']} marked")
    if "stopped_epoch" in training:
        notes.append(f"stopped after {training['stopped_epoch']} epochs")
    return "; ".join(notes)


def storage_note(metrics: dict[str, Any]) -> str:
    """How the run stored its member users' images, when some went in as JPEG (a base config with
    JPEG storage): their share and how much of the mark's noise part the stored records kept."""
    stored = metrics.get("stored_survival")  # absent in reports from before storage parity
    if not stored or not stored["member_jpeg_share"]:
        return ""
    noise = stored["storage"]["stored"]["noise"]
    return (f"members' images {100 * stored['member_jpeg_share']:.0f}% JPEG q{stored['jpeg_quality']}"
            + ("" if noise is None else f", noise part kept {noise:.2f}"))


AVERAGED = ("auc", "fpr_at_tpr_1", "tpr_at_fpr_0", "tpr_at_fpr_below_0.001", "tpr_at_fpr_below_0.0001",
            "largest_member_p_value", "largest_class_conditional_p_value", "test_accuracy")


def averages(table: Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means of the table's averaged row groups (e.g. single-target runs over target classes); None
    where a row's report predates the number."""
    by_name = {row["name"]: row for row in rows}
    out = []
    for name, members in table.averages.items():
        values = {key: [by_name[m].get(key) for m in members] for key in AVERAGED}
        out.append({"name": name, "rows": len(members),
                    **{key: None if None in v else sum(v) / len(v) for key, v in values.items()}})
    return out


def _num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(table: Table, rows: list[dict[str, Any]]) -> str:
    head = ("| variant | AUC | FPR @ 100% TPR (95% CI) | TPR @ FPR 0 (95% CI) | TPR @ FPR < 1e-3 / < 1e-4 (strict) | "
            "max member p: pooled / own class | instance AUC | train loss | test acc | PSNR dB | notes |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['name']} | {r['auc']:.3f} | {r['fpr_at_tpr_1']:.3f} ({r['fpr_at_tpr_1_interval'][0]:.3f}–"
             f"{r['fpr_at_tpr_1_interval'][1]:.3f}) | {r['tpr_at_fpr_0']:.2f} "
             f"({r['tpr_at_fpr_0_interval'][0]:.2f}–{r['tpr_at_fpr_0_interval'][1]:.2f}) | "
             f"{_num(r.get('tpr_at_fpr_below_0.001'), '.2f')} / {_num(r.get('tpr_at_fpr_below_0.0001'), '.2f')} | "
             f"{r['largest_member_p_value']:.3g} / {_num(r.get('largest_class_conditional_p_value'), '.3g')} | "
             f"{r['instance_auc']:.3f} | {r['train_loss']:.2g} | {r['test_accuracy']:.3f} | {r['psnr']:.1f} | "
             f"{row_notes(r)} |" for r in rows]
    means = averages(table, rows)
    if means:
        lines += ["", "| mean over | runs | AUC | FPR @ 100% TPR | TPR @ FPR 0 | TPR @ FPR < 1e-3 / < 1e-4 (strict) | "
                  "max member p: pooled / own class | test acc |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m['name']} | {m['rows']} | {m['auc']:.3f} | {m['fpr_at_tpr_1']:.3f} | {m['tpr_at_fpr_0']:.2f} | "
                  f"{_num(m['tpr_at_fpr_below_0.001'], '.2f')} / {_num(m['tpr_at_fpr_below_0.0001'], '.2f')} | "
                  f"{m['largest_member_p_value']:.3g} / {_num(m['largest_class_conditional_p_value'], '.3g')} | "
                  f"{m['test_accuracy']:.3f} |" for m in means]
    return (f"# {table.title}\n\nPaper: {table.claim}\n\nBase config `{table.base}` with {json.dumps(table.set)}; "
            "set-based audit of the marked model (M non-member users, smallest possible p-value "
            f"{rows[0]['smallest_possible_p_value']:.3g}; TPR @ FPR < t counts false positives strictly below t, "
            "as the official code does). Regenerate: `mtrack experiments "
            f"configs/experiments/{table.table}.yaml`.\n\n" + head + "\n".join(lines) + "\n")


def row_notes(row: dict[str, Any]) -> str:
    """What a countermeasure did, the member users' classes and the classes of the non-member users
    scoring below the worst member (where the report says)."""
    notes = [row.get("notes", "")]
    if row.get("member_classes"):
        notes.append("members: " + ", ".join(row["member_classes"]))
    if row.get("false_positives_by_class"):
        notes.append("below the worst member: " + ", ".join(f"{c} {n}" for c, n in row["false_positives_by_class"].items()))
    return "; ".join(n for n in notes if n)


def update_overview(results: Path, table: Table, rows: list[dict[str, Any]]) -> None:
    """The table's entry in results/README.md: the paper's claim, then ours for every row."""
    readme = results / "README.md"
    text = readme.read_text() if readme.exists() else (
        "# Experiment results\n\nEach table regenerates with `make experiments` (or `mtrack experiments "
        "<table yaml>`); the paper's claim is stated next to ours for each row.\n")
    sections = [part for part in text.split("\n## ") if part.strip()]
    header, entries = sections[0].rstrip() + "\n", {part.split("\n", 1)[0]: part for part in sections[1:]}
    entries[table.title] = f"{table.title}\n\nPaper: {table.claim}. Ours ([table]({table.table}/README.md)):\n\n" + "\n".join(
        f"- {r['name']}: AUC {r['auc']:.3f}, FPR @ 100% TPR {r['fpr_at_tpr_1']:.3f}, TPR @ FPR 0 "
        f"{r['tpr_at_fpr_0']:.2f}, largest member p {r['largest_member_p_value']:.3g}, test accuracy "
        f"{r['test_accuracy']:.3f}" + (f" ({r['notes']})" if r.get("notes") else "") for r in rows) + "\n"
    entries[table.title] += "".join(
        f"- mean over {m['name']} ({m['rows']} runs): AUC {m['auc']:.3f}, FPR @ 100% TPR {m['fpr_at_tpr_1']:.3f}, "
        f"TPR @ FPR 0 {m['tpr_at_fpr_0']:.2f}\n" for m in averages(table, rows))
    write_text(readme, header + "".join(f"\n## {entries[title]}" for title in sorted(entries)))


def on_base(table: Table, base: str) -> Table:
    """The table run on another base config (CIFAR, ImageNet): its own results folder, and its title's
    trailing parenthetical (the default setting) replaced by the base config's name."""
    name = load_config(base).name
    return table.model_copy(update={"table": f"{table.table}-{Path(base).stem}", "base": base,
                                    "title": f"{table.title.split(' (')[0]} ({name})"})


def planned_rows(path: str | Path, base: str | None = None) -> tuple[Table, str, list[tuple[Row, str, list[str], RunConfig]]]:
    """A table (on `base` when given), the base config file its rows start from and, per row, its
    run folder, config overrides and config. Every row's config is validated, so a bad row stops the table
    before any row runs."""
    path = Path(path)
    table = load_table(path)
    base_file = path.parent / table.base
    if base is not None:
        table, base_file = on_base(table, base), Path(base)
    base = str(base_file.resolve())
    runs = []
    for row in table.rows:
        settings = {**table.set, **row.set}
        folder = run_folder(base, settings)
        overrides = [f"{key}={json.dumps(value)}" for key, value in
                     {**settings, "run_dir": folder, "results_dir": f"{folder}/results"}.items()]
        try:
            cfg = load_config(base, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: row '{row.name}': {exc}") from None
        runs.append((row, folder, overrides, cfg))
    return table, base, runs


def run_table(path: str | Path, launcher: str = "local", results: Path = Path("results"),
              base: str | None = None) -> list[dict[str, Any]]:
    """Run every row of a table (finished rows are skipped by the stages themselves) and write it;
    with `base`, on that run config instead of the table's."""
    table, base_file, runs = planned_rows(path, base)
    rows = []
    for row, folder, overrides, cfg in runs:
        launch(base_file, overrides, launcher)
        metrics = read_json(output_path(cfg, "report", "metrics.json"))
        notes = "; ".join(note for note in (defense_notes(read_json(output_path(cfg, "train", "metrics.json", arm="marked"))),
                                            storage_note(metrics)) if note)
        rows.append({"name": row.name, "set": row.set, "run_dir": folder, **row_summary(metrics), "notes": notes})
    out = results / table.table
    write_json(out / "results.json", {"title": table.title, "claim": table.claim, "base": table.base,
                                      "set": table.set, "rows": rows, "averages": averages(table, rows)})
    write_text(out / "README.md", markdown(table, rows))
    update_overview(results, table, rows)
    return rows
