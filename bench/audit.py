"""Audit throughput: our scoring loop against a bare `model(x)` loop and a naive scorer.

All three read the same FFCV audit file with the same model, batch size and workers, taking turns
within each repeat so machine load hits them alike:
- ours: `score_samples` (fp32 margin and loss, ids, results written into preallocated arrays);
- bare forward: the same loader, `model(x)` only and nothing kept: the ceiling for any scorer;
- naive: per-batch cross-entropy with outputs and ids concatenated onto growing tensors each batch.
Run `python -m bench.audit` from the repository root; it writes results/bench/audit.json and the
`audit.json` line of results/bench/README.md.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import comparison, interleaved_medians, machine, publish, run_reporting_errors
from pipeline.config import AuditConfig
from pipeline.core.models import Normalized, build_model
from pipeline.data.betons import make_loader, write_beton
from pipeline.stages.audit import pick_device, score_samples

N_IMAGES, SIZE, BATCH, REPEATS = 8192, 32, 512, 5


@torch.no_grad()
def bare_forward(model: torch.nn.Module, beton: Path, cfg: AuditConfig, device: torch.device) -> None:
    for images, *_ in make_loader(beton, cfg.batch_size, cfg.num_workers, train=False):
        model(images.to(device, non_blocking=True))


@torch.no_grad()
def naive_scores(model: torch.nn.Module, beton: Path, cfg: AuditConfig, device: torch.device) -> torch.Tensor:
    losses, users = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    for images, labels, _, user in make_loader(beton, cfg.batch_size, cfg.num_workers, train=False):
        logits = model(images.to(device)).float().cpu()
        losses = torch.cat([losses, F.cross_entropy(logits, labels, reduction="none")])
        users = torch.cat([users, user])
    return losses


def _rate(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return N_IMAGES / (time.perf_counter() - start)


def main() -> None:
    device = pick_device()
    cfg = AuditConfig(batch_size=BATCH, num_workers=2)
    rng = np.random.default_rng(0)
    model = Normalized(build_model("small_cnn", 10, 32), (0.5,) * 3, (0.25,) * 3).eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        beton = Path(tmp) / "audit.beton"
        write_beton(
            beton,
            rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8),
            rng.integers(0, 10, N_IMAGES),
            np.arange(N_IMAGES),
            np.arange(N_IMAGES) // 10,
        )
        sides = {
            "ours": lambda: score_samples(model, beton, cfg, device),
            "bare": lambda: bare_forward(model, beton, cfg, device),
            "naive": lambda: naive_scores(model, beton, cfg, device),
        }
        for run in sides.values():  # warm-up: numba compilation of the FFCV pipeline, allocator
            run()
        median = interleaved_medians({name: (lambda run=run: _rate(run)) for name, run in sides.items()}, REPEATS)
    where = f"{SIZE}x{SIZE} small_cnn, batch {BATCH}, {device.type}"
    rows = [
        comparison(f"audit vs bare forward, {where}", median["ours"], median["bare"]),
        comparison(f"audit vs naive concatenation, {where}", median["ours"], median["naive"]),
    ]
    description = machine() + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    publish(
        "audit.json",
        rows,
        (
            f"- `audit.json` — audit scoring throughput ({where}): {rows[0]['ratio']:.2f}× a bare forward loop "
            f"(ours {median['ours']:.0f} img/s vs {median['bare']:.0f}), {rows[1]['ratio']:.2f}× naive per-batch "
            f"concatenation ({median['naive']:.0f} img/s)"
        ),
        description,
    )


if __name__ == "__main__":
    run_reporting_errors(main)
