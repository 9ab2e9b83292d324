"""Experiment tables: one YAML per table under `configs/experiments/`, each naming a base run config,
overrides common to all rows, one row per variant and the seeds each row is repeated over. Every
row × seed is a whole pipeline run (through either launcher) in its own run directory, whose stage
folders point into one store shared by every table: a stage whose config hash another row already
finished (the plan, marks and datasets of rows that differ only in training, or a baseline that
several tables share) is found done and runs once. The table's numbers go to
`results/<table>/results.json`, `README.md` and `spread.png`, and `results/README.md` lists every
table with the paper's claim next to what we measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, load_config
from ..launchers import check_before_running, launch
from ..stages.contract import config_hash, output_path, tasks
from ..store import read_json, write_json, write_text
from .render import markdown, plot_spread, update_overview
from .summary import group_means, run_summary, summarise
from .tables import Row, Table, load_table, on_base, with_seeds

__all__ = [
    "PlannedRun",
    "defense_notes",
    "load_table",
    "on_base",
    "planned_rows",
    "run_table",
    "run_tables",
    "share_stages",
]

RUNS = Path("runs/experiments")
STAGE_STORE = RUNS / "stages"


@dataclass(frozen=True)
class PlannedRun:
    """One row at one seed: its run folder, the config overrides that make it, and its config."""

    row: Row
    seed: int | None
    folder: str
    overrides: list[str]
    config: RunConfig


def run_folder(base: str, settings: dict[str, Any]) -> str:
    """Where a row runs at a seed, named by what it runs: rows of different tables with the same
    settings and seed share one run, so the second table finds it done."""
    key = json.dumps({"base": Path(base).name, "set": settings}, sort_keys=True)
    return str(RUNS / hashlib.sha256(key.encode()).hexdigest()[:12])


def share_stages(cfg: RunConfig, store: Path = STAGE_STORE) -> None:
    """Make each stage folder of this run a link to `store/<stage>-<config hash>`, so every run
    whose stage has the same hash (the same declared config and inputs) shares its outputs. A
    stage folder of its own (from before stages were shared) is left as it is."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks(cfg):
        shared = store / f"{task.name}-{config_hash(cfg, task)}"
        link = run_dir / task.name
        if link.is_symlink():
            if link.resolve() == shared.resolve():
                continue
            link.unlink()  # a config hash changed since (e.g. a new code version's): point at the new one
        elif link.exists():
            continue
        shared.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(shared, run_dir), target_is_directory=True)


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
    return f"members' images {100 * stored['member_jpeg_share']:.0f}% JPEG q{stored['jpeg_quality']}" + (
        "" if noise is None else f", noise part kept {noise:.2f}"
    )


def planned_rows(
    path: str | Path, base: str | None = None, seeds: int | None = None, wandb: str | None = None
) -> tuple[Table, str, list[PlannedRun]]:
    """A table (on `base` when given, over seeds 0..seeds-1 when given), the base config file its
    rows start from and every row × seed to run; with `wandb` ("offline" or "online"), logged to W&B
    in a group per table, each run labelled with its table, row and seed (logging only: the run
    folders and stage hashes stay the same). Every run's config is validated, so a bad row stops
    the table before any row runs."""
    path = Path(path)
    table = load_table(path)
    base_file = path.parent / table.base
    if base is not None:
        table, base_file = on_base(table, base), Path(base)
    if seeds is not None:
        table = with_seeds(table, seeds)
    base = str(base_file.resolve())
    runs = []
    for row in table.rows:
        for seed in table.seeds_of(row):
            settings = {**table.set, **row.set, **({} if seed is None else {"seed": seed})}
            folder = run_folder(base, settings)
            labels = {"table": table.table, "row": row.name, "seed": seed if seed is not None else "base"}
            logging = {"wandb.group": table.table, "wandb.labels": labels}
            if wandb is not None:
                logging.update({"wandb.enabled": True, "wandb.mode": wandb})
            overrides = [
                f"{key}={json.dumps(value)}"
                for key, value in {**settings, "run_dir": folder, "results_dir": f"{folder}/results", **logging}.items()
            ]
            try:
                cfg = load_config(base, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{path}: row '{row.name}'{'' if seed is None else f' seed {seed}'}: {exc}") from None
            runs.append(PlannedRun(row, cfg.seed, folder, overrides, cfg))
    return table, base, runs


def run_tables(
    paths: list[str | Path],
    launcher: str = "local",
    results: Path = Path("results"),
    base: str | None = None,
    seeds: int | None = None,
    wandb: str | None = None,
) -> list[list[dict[str, Any]]]:
    """Run every table named (see `run_table`); each table's rows. Every table is read and every run
    of every table checked (its config, and what its unfinished stages would refuse) before the
    first starts: a missing or bad second table stops nothing half-way."""
    planned = [planned_rows(path, base, seeds, wandb) for path in paths]
    checked: set[str] = set()
    for _, _, runs in planned:
        for run in runs:
            check_before_running(run.config, checked=checked)
    return [_run_planned(table, base_file, runs, launcher, results) for table, base_file, runs in planned]


def run_table(
    path: str | Path,
    launcher: str = "local",
    results: Path = Path("results"),
    base: str | None = None,
    seeds: int | None = None,
    wandb: str | None = None,
) -> list[dict[str, Any]]:
    """Run every row of a table at each of its seeds (finished stages, also other rows' and other
    tables', are skipped by the stages themselves) and write the table; with `base`, on that run
    config instead of the table's; with `seeds`, over seeds 0..seeds-1; with `wandb`, logged there
    (see `planned_rows`)."""
    return run_tables([path], launcher, results, base, seeds, wandb)[0]


def _run_planned(
    table: Table, base_file: str, runs: list[PlannedRun], launcher: str, results: Path
) -> list[dict[str, Any]]:
    by_row: dict[str, list[dict[str, Any]]] = {row.name: [] for row in table.rows}
    for run in runs:
        share_stages(run.config)
        launch(base_file, run.overrides, launcher)
        metrics = read_json(output_path(run.config, "report", "metrics.json"))
        training = read_json(output_path(run.config, "train", "metrics.json", arm="marked"))
        notes = "; ".join(note for note in (defense_notes(training), storage_note(metrics)) if note)
        by_row[run.row.name].append({"seed": run.seed, "run_dir": run.folder, **run_summary(metrics), "notes": notes})
    rows = summarise(
        [{"name": row.name, "set": row.set, "runs": by_row[row.name]} for row in table.rows], table.baseline_row.name
    )
    means = group_means(table.averages, rows)
    out = results / table.table
    write_json(
        out / "results.json",
        {
            "title": table.title,
            "claim": table.claim,
            "base": table.base,
            "set": table.set,
            "baseline": table.baseline_row.name,
            "interval": "95% Student-t over seeds, cut to the range a number can take; differences paired by seed",
            "rows": rows,
            "averages": means,
        },
    )
    write_text(out / "README.md", markdown(table, rows, means))
    plot_spread(rows, out / "spread.png", table.title)
    update_overview(results, table, rows, means)
    return rows
