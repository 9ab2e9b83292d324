"""The import graph of `pipeline/` by layer, and the drawing of it in docs/architecture.md.

    python scripts/import_graph.py          # rewrite docs/architecture.md from the code

Each module belongs to a layer; a layer may import only the layers it lists in ALLOWED (and
itself). tests/test_layers.py checks the rule, the absence of cycles, and that the committed
drawing is the one this script draws from the current code.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
DRAWING = REPO / "docs" / "architecture.md"

BASE = ("config", "store", "registry", "console", "usage")
APP = ("cli", "experiments", "rehearsal")
# Lowest first. A layer imports only from the layers listed for it (and within itself).
ALLOWED: dict[str, tuple[str, ...]] = {
    "base": (),
    "core": ("base",),
    "data": ("base", "core"),
    "training": ("base", "core", "data"),
    "stages": ("base", "core", "data", "training", "owner"),  # owners in a run mark with their own tool
    "launchers": ("base", "core", "stages"),
    "owner": ("base", "core", "data"),
    "app": ("base", "core", "data", "training", "stages", "launchers", "owner"),
}
WHAT = {
    "base": "config, run directory, registries, console, resource usage",
    "core": "marking, survival, quality, scoring, statistics, metrics, models, seeds",
    "data": "image files, sources, FFCV files, torch loader, OOD pool",
    "training": "Lightning module, schedules, callbacks, countermeasures",
    "stages": "stage contracts, the DAG, plan · mark · write · train · audit · report, W&B",
    "launchers": "local processes, SLURM through submitit",
    "owner": "the data owner's mtrack owner mark / audit",
    "app": "the mtrack command, experiment tables, rehearsals",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # the package itself
    if parts[1] in BASE:
        return "base"
    return "app" if parts[1] in APP else parts[1]


def imports(path: Path) -> set[str]:
    """The pipeline modules a file imports (relative imports resolved), wherever in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found |= {n for n in names + [target] if n.startswith("pipeline")}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipeline")}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name != module}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer_edges(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(layer_of(a), layer_of(b)) for a, targets in edges.items() for b in targets if layer_of(a) != layer_of(b)}


def drawing(edges: dict[str, set[str]]) -> str:
    lines = [
        "# Architecture: the import graph of `pipeline/`",
        "",
        "Drawn by `python scripts/import_graph.py` from the code (tests/test_layers.py fails when it is out of",
        "date). An arrow `a --> b` means a module of layer `a` imports one of layer `b`; every arrow points",
        "down, to a layer `a` may use. The owner's tool uses only the core and data access.",
        "",
        "Every stage is declared once, in `STAGES` (`pipeline/stages/contract.py`): the config it reads, the",
        "files it reads and writes, and what the layers above need to know of it: the config key of its",
        "shard count, how its SLURM job maps tasks to devices (one task, one per GPU, or Lightning's one per",
        "device), and what it pushes through its main loop for the cost estimate. The launchers, the cost",
        "estimate and the pre-flight check read these facts and name no stage; the command line has a",
        "subcommand per entry, and `launch.slurm.stages` takes the names of the table. Adding a stage is",
        "its module, its `STAGES` entry and its config section (`tests/test_stage_table.py` adds one).",
        "",
        "```mermaid",
        "flowchart TD",
    ]
    for layer in reversed(ALLOWED):
        lines.append(f'    {layer}["<b>{layer}</b><br/>{WHAT[layer]}"]')
    order = list(ALLOWED)
    for a, b in sorted(layer_edges(edges), key=lambda e: (-order.index(e[0]), -order.index(e[1]))):
        lines.append(f"    {a} --> {b}")
    lines += ["```", "", "| layer | modules |", "|---|---|"]
    for layer in ALLOWED:
        members = sorted(m.removeprefix("pipeline.") for m in edges if layer_of(m) == layer and m != "pipeline")
        lines.append(f"| {layer} | {', '.join(f'`{m}`' for m in members)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    DRAWING.parent.mkdir(exist_ok=True)
    DRAWING.write_text(drawing(graph()))
    print(f"wrote {DRAWING.relative_to(REPO)}", file=sys.stderr)
