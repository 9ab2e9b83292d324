"""How long an owner waits for `mtrack owner audit`: the audit as it runs now against the audit as it
ran when issue 24 asked for one an owner can wait for (commit BASELINE, where the same audit took
9 min 17 s on a busy machine), side by side on the same photos.

The owner holds 200 photos of 512 x 384 pixels (JPEGs of one tint plus noise), publishes 20 with the
default subset design and its 999 draws, and audits at the default level 0.05 a model cheap enough
that the audit's own work (marking up to K (B + 1) images, the p-value) is what is timed. Two models:
one that never saw the photos (owners' p-values spread over [0, 1], so each audit stops when its own
p says) and one that recalls the published copies exactly (the strongest evidence), audited by
default (ending early once the verdict is clear) and with --all-draws (the full p). Each side runs
`bench/owner_speed_worker.py` in its own process with its own `pipeline` package: this checkout's, and
BASELINE's extracted from the git history, so the baseline is the code users ran, not an imitation.
Both sides must publish the same bytes (marking unchanged) and reach the same verdicts. The baseline
scores every draw, so its cost does not depend on the owner: it audits the first owner of each model.
Seconds are CPU seconds of the auditing process (what the audit costs, whatever else the machine
runs), wall seconds beside them.

    python -m bench.owner_speed [--photos 200] [--draws 999] [--owners 5]

writes results/bench/owner_speed.json and its line in results/bench/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli import CommandParser
from pipeline.console import log
from pipeline.store import StageError

from .common import machine, publish, run_reporting_errors, write_jpeg_folder

BASELINE = "f9c48a4088f78c250416d6768e77c29db6b5d095"  # the tree issue 24 was filed against
REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("owner_speed_worker.py")
LEVEL = 0.05
CASES = (  # (row, model, --all-draws)
    ("never trained on", "never", False),
    ("trained on (exact recall)", "recall", False),
    ("trained on (exact recall), every draw scored (--all-draws)", "recall", True),
)


def baseline_tree(into: Path) -> Path:
    """BASELINE's `pipeline` package, extracted from this clone's git history into `into`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", BASELINE, "pipeline"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise StageError(
            f"git archive {BASELINE[:7]}: {archive.stderr.decode().strip() or 'failed'} (the baseline is read from "
            "the git history: run from a full clone, not a shallow one or an exported tree)"
        )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def audits(
    tree: Path, photos: Path, out: Path, seeds: list[int], model: str, draws: int, every: bool = False
) -> list[dict[str, Any]]:
    """The worker's rows: `seeds`' owners audited with `tree`'s pipeline, in a process of its own
    (`every`: with --all-draws)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(WORKER), str(photos), str(out), "--model", model, "--draws", str(draws)]
    command += ["--all-draws"] if every else []
    done = subprocess.run([*command, "--seeds", *map(str, seeds)], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StageError(f"{WORKER.name} with {tree}: {done.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def run(n_photos: int, draws: int, owners: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_jpeg_folder(Path(tmp), "photos", 1, n_photos, ((512, 384),))
        photos, before = Path(tmp) / "photos", baseline_tree(Path(tmp) / "baseline")
        earlier_of: dict[str, dict[str, Any]] = {}
        for case, model, every in CASES:
            seeds = list(range(owners))
            log.info(f"owner_speed: {case}: {owners} owner(s) now, 1 with the audit of {BASELINE[:7]}")
            ours = audits(REPO, photos, Path(tmp) / "ours", seeds, model, draws, every)
            if model not in earlier_of:  # it scores every draw: one run per model serves each of its rows
                [earlier_of[model]] = audits(before, photos, Path(tmp) / "baseline-out", seeds[:1], model, draws)
            earlier = earlier_of[model]
            if ours[0]["published_sha256"] != earlier["published_sha256"]:
                raise StageError(f"{case}: the owner's published copies differ from {BASELINE[:7]}'s: marking changed")
            if (ours[0]["p_value"] <= LEVEL) != (earlier["p_value"] <= LEVEL):
                raise StageError(f"{case}: verdicts differ (p {ours[0]['p_value']} vs {earlier['p_value']})")
            mean = {field: float(np.mean([o[field] for o in ours])) for field in ("cpu_s", "wall_s", "queries")}
            rows.append(
                {
                    "case": f"owner audit, {case}: {n_photos} photos 512x384, {n_photos // 10} published, "
                    f"{draws} draws",
                    "ours": 3600 / mean["cpu_s"],
                    "baseline": 3600 / earlier["cpu_s"],
                    "unit": "audits/CPU-hour",
                    "ratio": earlier["cpu_s"] / mean["cpu_s"],
                    "wall_ratio": earlier["wall_s"] / mean["wall_s"],
                    "owners": len(ours),
                    "baseline_commit": BASELINE,
                    "cpu_seconds": {"ours": mean["cpu_s"], "baseline": earlier["cpu_s"]},
                    "wall_seconds": {"ours": mean["wall_s"], "baseline": earlier["wall_s"]},
                    "queries": {"ours": mean["queries"], "baseline": earlier["queries"]},
                    "p_value": {"ours": [o["p_value"] for o in ours], "baseline": earlier["p_value"]},
                    "candidates_scored": {"ours": [o["scored"] for o in ours], "baseline": earlier["scored"]},
                }
            )
    return rows


def readme_line(rows: list[dict[str, Any]]) -> str:
    parts = [
        f"{row['case'].split(':')[0].removeprefix('owner audit, ')} ({row['owners']} owner"
        f"{'s, mean' if row['owners'] > 1 else ''}): {row['ratio']:.1f}× CPU, {row['wall_ratio']:.1f}× wall "
        f"({row['cpu_seconds']['ours']:.1f} vs {row['cpu_seconds']['baseline']:.0f} CPU-s, "
        f"{row['wall_seconds']['ours']:.1f} vs {row['wall_seconds']['baseline']:.0f} s, "
        f"{row['queries']['ours']:,.0f} vs {row['queries']['baseline']:,.0f} queries)"
        for row in rows
    ]
    setting = rows[0]["case"].split(": ", 1)[1]
    return (
        f"- `owner_speed.json` — `mtrack owner audit` ({setting}, level {LEVEL}, a model as cheap as a "
        f"lookup) vs the same audit at {BASELINE[:7]} (when issue 24 was filed): " + "; ".join(parts)
    )


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="python -m bench.owner_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--draws", type=int, default=999)
    parser.add_argument("--owners", type=int, default=5, help="owners audited the current way, per model")
    args = parser.parse_args(argv)
    rows = run(args.photos, args.draws, args.owners)
    publish("owner_speed.json", rows, readme_line(rows), machine())


if __name__ == "__main__":
    run_reporting_errors(main)
