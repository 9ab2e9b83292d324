"""What the benchmarks share: where results go, the machine they ran on, and the README index."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.store import write_json, write_text

RESULTS = Path(__file__).resolve().parents[1] / "results"


def run_reporting_errors(main: Callable[[], int | None]) -> None:
    """Run a benchmark's `main` as a command: a bad config, flag or input, or a path it cannot read or
    write, ends in one `error:` line and exit status 2, as the pipeline's own commands do, not in a
    traceback; otherwise exit with what `main` returns."""
    from pipeline.cli import USER_ERRORS
    from pipeline.console import console

    try:
        with console():  # the benchmark's own progress lines, as the CLI's
            status = main()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform's guess where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line stored with every result, enough to tell whether two result files are comparable."""
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, numpy {np.__version__}"


BENCH_README_HEADER = """# Benchmarks

Each line summarises one JSON file in this folder. `ratio` is ours / baseline on the same machine in
the same run, so a ratio above 1 means ours is faster. The numbers come from `make bench`, which
rewrites the files and their lines here.
"""


def update_bench_readme(name: str, line: str, readme: Path = RESULTS / "bench" / "README.md") -> None:
    """Replace the line for result file `name` in the benchmark README (append it if absent), so
    every benchmark keeps its own line however many have run."""
    lines = readme.read_text().splitlines() if readme.exists() else BENCH_README_HEADER.splitlines() + [""]
    prefix = f"- `{name}`"
    index = next((i for i, existing in enumerate(lines) if existing.startswith(prefix)), None)
    if index is None:
        lines.append(line)
    else:
        lines[index] = line
    write_text(readme, "\n".join(lines) + "\n")


def interleaved_medians(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median rate of each side over `repeats` rounds; the sides alternate within every round, so a
    change in machine load hits all of them alike (the ratio is what we report)."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            rates[name].append(run())
    return {name: statistics.median(r) for name, r in rates.items()}


def comparison(case: str, ours: float, baseline: float, unit: str = "img/s") -> dict[str, Any]:
    """One result row; ratio > 1 means ours is faster."""
    return {"case": case, "ours": ours, "baseline": baseline, "unit": unit, "ratio": ours / baseline}


def publish(name: str, rows: list[dict[str, Any]], readme_line: str, description: str | None = None) -> None:
    """Write results/bench/<name>, its line in the benchmark README, and the rows to stdout."""
    write_json(RESULTS / "bench" / name, {"rows": rows, "machine": description or machine()})
    update_bench_readme(name, readme_line)
    for row in rows:
        print(
            f"{row['case'][:90]:<90} ours {row['ours']:9.1f}  baseline {row['baseline']:9.1f} {row['unit']}"
            f"  x{row['ratio']:.3f}"
        )


def write_jpeg_folder(
    root: Path, split: str, n_classes: int, per_class: int, sizes: tuple[tuple[int, int], ...], seed: int = 0
) -> None:
    """`root/split/class-<c>/img-<i>.JPEG`: per class a tint plus noise, with sizes cycling through
    `sizes` (width, height), as an ImageNet-style folder for benchmarks and tests."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        folder = root / split / f"class-{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.integers(40, 216, 3)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            pixels = np.clip(tint + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img-{i:04d}.JPEG", quality=90)
