"""The package's layers: every import points down, there are no cycles, the drawing is current,
and the owner's commands load neither FFCV, plotting, image-quality nor training code."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import REPO

spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_every_import_points_to_a_layer_below() -> None:
    edges = import_graph.graph()
    wrong = [
        f"{a} -> {b}"
        for a, targets in edges.items()
        for b in targets
        if import_graph.layer_of(b) not in (import_graph.layer_of(a), *import_graph.ALLOWED[import_graph.layer_of(a)])
    ]
    assert not wrong, wrong
    assert len(edges) > 40 and ("owner", "stages") not in import_graph.layer_edges(edges)


def test_no_import_cycles() -> None:
    edges, state = import_graph.graph(), {}

    def visit(module: str, path: tuple[str, ...]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(path + (module,))}"
        state[module] = "open"
        for target in sorted(edges[module]):
            visit(target, path + (module,))
        state[module] = "done"

    for module in edges:
        visit(module, ())


def test_the_committed_drawing_is_current() -> None:
    assert import_graph.DRAWING.read_text() == import_graph.drawing(import_graph.graph()), (
        "run python scripts/import_graph.py and commit docs/architecture.md"
    )


def test_owner_commands_load_no_stage_training_or_plotting_code(tmp_path) -> None:
    probe = (
        "import sys; from pipeline.cli import main; assert main(sys.argv[1:]) == 0; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'ffcv', 'matplotlib', 'skimage', 'lightning'}); "
        "stages = sorted(m for m in sys.modules if m.startswith(('pipeline.stages.', 'pipeline.training'))); "
        "print(heavy, [m for m in stages if m not in ('pipeline.stages.contract', 'pipeline.stages.dag')])"
    )
    import numpy as np
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i in range(2):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "owner",
            "mark",
            str(tmp_path / "photos"),
            "--out",
            str(tmp_path / "out"),
            "--design",
            "pattern",
            "--n-patterns",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[] []"
