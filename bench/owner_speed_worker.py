"""One side of `bench.owner_speed`: marks a folder for a few owners and times `audit_owner` on each,
with whichever `pipeline` package PYTHONPATH gives (this checkout's, or the one issue 24 was filed
against). It imports from `pipeline` only what both have, and prints one JSON line per audit.

    PYTHONPATH=TREE python bench/owner_speed_worker.py PHOTOS OUT --seeds 0 1 --model never|recall
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.config import MarkConfig
from pipeline.owner.audit import Predictor, audit_owner
from pipeline.owner.designs import DesignParams
from pipeline.owner.marking import mark_folder

LEVEL = 0.05  # the command line's default level
STRIDE = 8  # the stand-in models look at every 8th pixel each way: their cost stays far below the audit's


def brightness_logits(batch: torch.Tensor) -> torch.Tensor:
    """Three classes scored from the mean brightness: a model that never saw any photo."""
    m = batch[:, :, ::STRIDE, ::STRIDE].float().mean(dim=(1, 2, 3)) / 50
    return torch.stack([m, -m, torch.zeros_like(m)], 1)


def fingerprint(image: np.ndarray) -> bytes:
    """(C, H, W) or (H, W, C) -> a digest of every 8th pixel: another pattern or image changes it."""
    grid = image[:, ::STRIDE, ::STRIDE] if image.shape[0] == 3 else image[::STRIDE, ::STRIDE].transpose(2, 0, 1)
    return hashlib.sha256(np.ascontiguousarray(grid).tobytes()).digest()


class Counted:
    """The model, counting the images sent to it (the earlier audit did not count its queries)."""

    def __init__(self, known: set[bytes] | None) -> None:
        self.known, self.queries = known, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.queries += len(batch)
        logits = brightness_logits(batch)
        if self.known is not None:  # recalls the published marked copies exactly: a very confident class 0
            for i, image in enumerate(batch.numpy()):
                if fingerprint(image) in self.known:
                    logits[i] = torch.tensor([30.0, 0.0, 0.0])
        return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--model", choices=("never", "recall"), required=True)
    parser.add_argument("--draws", type=int, default=999)
    parser.add_argument("--all-draws", action="store_true", help="score every draw (this checkout's audit only)")
    args = parser.parse_args()
    n_photos = sum(1 for _ in args.photos.rglob("*.JPEG"))
    for seed in args.seeds:
        out = args.out / f"marked-{seed}"
        params = DesignParams(publish=n_photos // 10, draws=args.draws)
        key = mark_folder(args.photos, out, MarkConfig(), seed=seed, label=0, params=params, force=True)
        copies = [cv2.imread(str(out / key["files"][i]["marked"]), cv2.IMREAD_UNCHANGED) for i in key["published"]]
        published = [cv2.cvtColor(c, cv2.COLOR_BGR2RGB) for c in copies]
        model = Counted({fingerprint(image) for image in published} if args.model == "recall" else None)
        cpu, wall = time.process_time(), time.perf_counter()
        every = {"all_draws": True} if args.all_draws else {}  # the earlier audit scored every draw anyway
        result = audit_owner(key, Predictor(model, "model"), draws_seed=1, alpha=LEVEL, **every)
        row = {
            "seed": seed,
            "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall,
            "queries": model.queries,
            "p_value": result["p_value"],
            "scored": result.get("n_scored", result["n_candidates"]),  # the earlier audit scored every one
            "published_sha256": hashlib.sha256(b"".join(np.ascontiguousarray(c).tobytes() for c in copies)).hexdigest(),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
