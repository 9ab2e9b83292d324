"""How long an owner waits for `mtrack owner audit`: the audit as it runs now against the audit as
it ran before (every candidate scored, the Perlin maps as one dense matrix product), side by side
on the same folder, key and draws.

The owner holds 200 photos of 512 x 384 pixels (JPEGs of one tint plus noise), publishes 20 with
the default subset design and its 999 draws, and audits a model through a callable cheap enough
that the audit's own work (marking K (B + 1) images, the p-value) is what is timed. Two models: one
that never saw the photos (the audit can stop early) and one that recalls the published copies
exactly (every draw must be scored for p to reach its floor). Seconds are CPU seconds of this
process (what the audit costs, whatever else the machine runs), wall seconds beside them.

    python -m bench.owner_speed [--photos 200] [--draws 999] [--owners 5]

writes results/bench/owner_speed.json and its line in results/bench/README.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import cv2
import numpy as np
import torch

from pipeline.cli import CommandParser
from pipeline.config import MarkConfig
from pipeline.core import marking
from pipeline.owner.audit import Predictor, audit_owner
from pipeline.owner.designs import DesignParams
from pipeline.owner.marking import mark_folder

from .common import machine, publish, run_reporting_errors, write_jpeg_folder

LEVEL = 0.05  # the command line's default level


STRIDE = 8  # the stand-in models look at every 8th pixel each way: their cost stays far below the audit's


def brightness_logits(batch: torch.Tensor) -> torch.Tensor:
    """Three classes scored from the mean brightness: a model that never saw any photo."""
    m = batch[:, :, ::STRIDE, ::STRIDE].float().mean(dim=(1, 2, 3)) / 50
    return torch.stack([m, -m, torch.zeros_like(m)], 1)


def _fingerprint(image: np.ndarray) -> bytes:
    """(C, H, W) or (H, W, C) -> a digest of every 8th pixel: another pattern or image changes it."""
    grid = image[:, ::STRIDE, ::STRIDE] if image.shape[0] == 3 else image[::STRIDE, ::STRIDE].transpose(2, 0, 1)
    return hashlib.sha256(np.ascontiguousarray(grid).tobytes()).digest()


class Recall:
    """A model that recalls the published marked copies exactly (a very confident class 0 on them)."""

    def __init__(self, published: list[np.ndarray]) -> None:
        self.known = {_fingerprint(image) for image in published}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        logits = brightness_logits(batch)
        for i, image in enumerate(batch.numpy()):
            if _fingerprint(image) in self.known:
                logits[i] = torch.tensor([30.0, 0.0, 0.0])
        return logits


def dense_rows(columns: np.ndarray, weights: np.ndarray, right: np.ndarray, out: np.ndarray) -> None:
    """The earlier Perlin product: the left factor built densely, then one matrix product."""
    out[...] = marking.dense_left(columns, weights, len(right)) @ right


def timed_audit(key: dict[str, Any], model: Any, earlier: bool) -> dict[str, Any]:
    """One audit at the default level: as it runs now, or (earlier) with every draw scored and the
    dense Perlin product."""
    cpu, wall = time.process_time(), time.perf_counter()
    with mock.patch.object(marking, "_sparse_rows", dense_rows) if earlier else contextlib.nullcontext():
        result = audit_owner(key, Predictor(model, "model"), draws_seed=1, alpha=LEVEL, all_draws=earlier)
    return {**result, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def run(n_photos: int, draws: int, owners: int) -> list[dict[str, Any]]:
    """Never trained on: `owners` owners (their own seeds; how early the audit stops depends on where
    their p falls) audited now, the first also as before (which scores every draw, so its cost does
    not depend on the owner). Trained on: one owner, both ways."""
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_jpeg_folder(Path(tmp), "photos", 1, n_photos, ((512, 384),))
        folder = Path(tmp) / "photos"
        params = DesignParams(publish=n_photos // 10, draws=draws)
        keys = [
            mark_folder(folder, Path(tmp) / f"marked{s}", MarkConfig(), seed=s, label=0, params=params)
            for s in range(owners)
        ]
        published = [
            cv2.cvtColor(cv2.imread(str(Path(tmp) / "marked0" / keys[0]["files"][i]["marked"])), cv2.COLOR_BGR2RGB)
            for i in keys[0]["published"]
        ]
        for case, model, audited in (
            ("never trained on", brightness_logits, keys),
            ("trained on (exact recall)", Recall(published), keys[:1]),
        ):
            ours = [timed_audit(key, model, earlier=False) for key in audited]
            earlier = timed_audit(keys[0], model, earlier=True)
            assert (ours[0]["p_value"] <= LEVEL) == (earlier["p_value"] <= LEVEL), (case, ours[0], earlier)
            mean = {field: float(np.mean([o[field] for o in ours])) for field in ("cpu_s", "wall_s", "queries")}
            rows.append(
                {
                    "case": f"owner audit, {case}: {n_photos} photos 512x384, {n_photos // 10} published, "
                    f"{draws} draws",
                    "ours": 3600 / mean["cpu_s"],
                    "baseline": 3600 / earlier["cpu_s"],
                    "unit": "audits/CPU-hour",
                    "ratio": earlier["cpu_s"] / mean["cpu_s"],
                    "owners": len(ours),
                    "cpu_seconds": {"ours": mean["cpu_s"], "baseline": earlier["cpu_s"]},
                    "wall_seconds": {"ours": mean["wall_s"], "baseline": earlier["wall_s"]},
                    "queries": {"ours": mean["queries"], "baseline": earlier["queries"]},
                    "p_value": {"ours": [o["p_value"] for o in ours], "baseline": earlier["p_value"]},
                    "candidates_scored": {"ours": [o["n_scored"] for o in ours], "baseline": earlier["n_scored"]},
                }
            )
    return rows


def readme_line(rows: list[dict[str, Any]]) -> str:
    parts = [
        f"{row['case'].split(':')[0].removeprefix('owner audit, ')} ({row['owners']} owner"
        f"{'s, mean' if row['owners'] > 1 else ''}): {row['ratio']:.1f}× ({row['cpu_seconds']['ours']:.0f} vs "
        f"{row['cpu_seconds']['baseline']:.0f} CPU-s, {row['queries']['ours']:,.0f} vs "
        f"{row['queries']['baseline']:,.0f} queries)"
        for row in rows
    ]
    setting = rows[0]["case"].split(": ", 1)[1]
    return (
        f"- `owner_speed.json` — `mtrack owner audit` ({setting}, level {LEVEL}, a model as cheap as a "
        "lookup) vs the audit before sequential stopping and the sparse Perlin product: " + "; ".join(parts)
    )


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="python -m bench.owner_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--draws", type=int, default=999)
    parser.add_argument("--owners", type=int, default=5, help="never-trained-on owners audited the current way")
    args = parser.parse_args(argv)
    rows = run(args.photos, args.draws, args.owners)
    publish("owner_speed.json", rows, readme_line(rows), machine())


if __name__ == "__main__":
    run_reporting_errors(main)
