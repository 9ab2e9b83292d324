"""Stage contracts: a stage's hash follows exactly the config it reads, and it can read nothing else."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from pydantic import BaseModel, ValidationError

from pipeline.config import RunConfig, load_config
from pipeline.stages.contract import STAGES, Task, config_hash, context, dependencies, output_path, stage_for, tasks
from pipeline.store import StageError, read_json


def leaf_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every settable leaf of the config schema, as (path, annotation); nested sections are walked."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaf_keys(annotation, (*prefix, name))
        else:
            yield (*prefix, name), annotation


def other_values(value: Any, annotation: Any) -> list[Any]:
    """Values different from `value` that the annotation may accept (validation decides)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return [a for a in args if a != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, 8, 64]
    if isinstance(value, float):
        return [value * 0.5, value * 1.5, value + 0.1, 0.5]
    if isinstance(value, str):
        return [value + "-x"]
    if value is None:
        return [32, 0.5, "other", True, "stripes"]
    if isinstance(value, tuple) and value:
        return [value[:1], ()]
    return []


def perturbed(cfg: RunConfig, path: tuple[str, ...], annotation: Any) -> RunConfig | None:
    """`cfg` with one leaf changed to another valid value, or None if no such value validates."""
    tree = cfg.model_dump(mode="json")
    node = tree
    for key in path[:-1]:
        node = node[key]
    for candidate in other_values(node[path[-1]], annotation):
        node[path[-1]] = candidate
        try:
            changed = RunConfig.model_validate(tree)
        except ValidationError:
            continue
        if getattr(changed, path[0]) != getattr(cfg, path[0]):
            return changed
    return None


def depends_on(task: Task, cfg: RunConfig, path: tuple[str, ...]) -> bool:
    """Whether a task's outputs depend on one config leaf: its section is declared by the task or a
    stage it reads, and not as unhashed; or it is the list of arms and the task reads every arm."""
    dotted = ".".join(path)
    if path[0] in task.spec.config and dotted not in task.spec.unhashed:
        return True
    if dotted == "train.arms" and any(read.arm == "all" for read in task.spec.reads.values()):
        return True
    return any(depends_on(dep, cfg, path) for dep in dependencies(cfg, task))


@pytest.fixture(scope="module")
def base() -> RunConfig:
    return load_config(REPO / "configs" / "tiny.yaml")


def test_a_stage_hash_changes_exactly_with_the_config_it_reads(base: RunConfig) -> None:
    perturbable = 0
    sections_seen: set[str] = set()
    for path, annotation in leaf_keys(RunConfig):
        changed = perturbed(base, path, annotation)
        if changed is None:
            continue
        perturbable += 1
        sections_seen.add(path[0])
        for task in tasks(base):
            if task not in tasks(changed):  # e.g. an arm switched off: its tasks are gone
                continue
            differs = config_hash(base, task) != config_hash(changed, task)
            reads = depends_on(task, base, path)
            assert differs == reads, f"{'.'.join(path)}: {task.name} hash {'changed' if differs else 'unchanged'}"
    assert perturbable > 60
    assert sections_seen == set(RunConfig.model_fields)


def test_a_stage_cannot_read_config_it_does_not_declare(base: RunConfig) -> None:
    for spec in STAGES.values():
        ctx = context(base, Task(spec.name, "marked" if spec.arms else None))
        for key in RunConfig.model_fields:
            if key in spec.config:
                assert getattr(ctx.config, key) == getattr(base, key)
            else:
                with pytest.raises(StageError, match=f"reads config '{key}' without declaring it"):
                    getattr(ctx.config, key)


def test_reads_name_declared_outputs_of_earlier_stages() -> None:
    order = list(STAGES)
    for spec in STAGES.values():
        for name, read in spec.reads.items():
            assert order.index(read.stage) < order.index(spec.name), (spec.name, name)
            for arm in ("marked", "control"):
                assert STAGES[read.stage].declares(read.file_for(arm)), (spec.name, name)
    with pytest.raises(StageError, match="does not write"):
        output_path(RunConfig(), "plan", "model.pt")


@pytest.mark.slow
def test_finished_stages_wrote_only_declared_files(tiny_run: Path) -> None:
    cfg = load_config(tiny_run)
    for task in tasks(cfg):
        stage = stage_for(cfg, task)
        outputs = read_json(stage.path("manifest.json"))["outputs"]
        assert outputs and all(task.spec.declares(name) for name in outputs), task.name
