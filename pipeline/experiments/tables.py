"""An experiment table as its YAML states it: a base run config, overrides common to all rows, one
row per variant, and the seeds every row is repeated over (the baseline row usually more)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, model_validator

from ..config import MAX_SEED, ConfigError, StrictModel, load_config, read_yaml, validation_problem

Seeds = tuple[int, ...]


def _check_seeds(seeds: Seeds | None, where: str) -> None:
    if seeds is None:
        return
    if not seeds:
        raise ValueError(f"{where}: seeds is empty; leave it out to run the base config's own seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds repeat a value")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"{where}: seeds must lie in 0..{MAX_SEED}")


class Row(StrictModel):
    name: str = Field(min_length=1)
    set: dict[str, Any] = {}  # dotted config keys -> values, on top of the table's
    seeds: Seeds | None = None  # this row's seeds instead of the table's (e.g. more for the baseline)


def _plain_name(name: str) -> str:
    """A table's name is a folder under results/: one plain name, so no table writes outside it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or ".." in name:
        raise ValueError(f"{name!r:.60} is not a plain name (letters, digits, . _ -), so not a folder in results/")
    return name


class Table(StrictModel):
    table: Annotated[str, AfterValidator(_plain_name)]  # folder name under results/ and runs/experiments/
    title: str
    base: str  # run config the rows start from, relative to this file
    claim: str  # what the paper says this table should show
    set: dict[str, Any] = {}
    # Every row runs once per seed (the run config's `seed`: which users, images and patterns the
    # plan draws, the JPEG draw and training); None: once, with the base config's own seed.
    seeds: Seeds | None = None
    baseline: str | None = None  # the row every other is compared with; None: the first row
    rows: list[Row] = Field(min_length=1)
    averages: dict[str, list[str]] = {}  # name -> rows averaged into one line (e.g. one per target class)

    @model_validator(mode="after")
    def _consistent(self) -> Table:
        names = [row.name for row in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"rows: two rows are named {next(n for n in names if names.count(n) > 1)!r}")
        for name, members in self.averages.items():
            if missing := [m for m in members if m not in names]:
                raise ValueError(f"averages '{name}': no row named {missing[0]!r}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: no row named {self.baseline!r}")
        _check_seeds(self.seeds, "seeds")
        for row in self.rows:
            _check_seeds(row.seeds, f"row '{row.name}'")
            if "seed" in {**self.set, **row.set} and (row.seeds or self.seeds) is not None:
                raise ValueError(f"row '{row.name}': sets 'seed' although the table has seeds; list it under seeds")
        return self

    @property
    def baseline_row(self) -> Row:
        return next(row for row in self.rows if row.name == (self.baseline or self.rows[0].name))

    def seeds_of(self, row: Row) -> tuple[int | None, ...]:
        """The seeds `row` runs with; (None,) for one run with the base config's seed."""
        return row.seeds or self.seeds or (None,)


def load_table(path: Path) -> Table:
    try:
        return Table.model_validate(read_yaml(path, "experiment table"))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_problem(exc)}") from None


def on_base(table: Table, base: str) -> Table:
    """The table run on another base config (CIFAR, ImageNet): its own results folder, and its title's
    trailing parenthetical (the default setting) replaced by the base config's name."""
    name = load_config(base).name
    return table.model_copy(
        update={
            "table": f"{table.table}-{Path(base).stem}",
            "base": base,
            "title": f"{table.title.split(' (')[0]} ({name})",
        }
    )


def with_seeds(table: Table, n: int) -> Table:
    """The table with every row (the baseline too) repeated over seeds 0..n-1 (`--seeds N`)."""
    if n < 1:
        raise ConfigError(f"--seeds {n}: needs at least one seed")
    if any("seed" in {**table.set, **row.set} for row in table.rows):
        raise ConfigError(f"table {table.table}: a row sets 'seed'; --seeds cannot repeat it over seeds")
    return table.model_copy(
        update={"seeds": tuple(range(n)), "rows": [row.model_copy(update={"seeds": None}) for row in table.rows]}
    )
