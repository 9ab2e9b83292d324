"""A data owner's own marking: `mtrack mark <folder> --out <folder>`.

Marks every image in a folder (any size or format; grey, RGBA, 16-bit, palette and EXIF-rotated
images become upright RGB) and writes lossless PNG copies plus a private key file holding what a
later audit needs: the seed, the pattern, the parameters and the hashes of every original and
marked file. Originals are never touched: the output folder may not be, contain, or sit inside the
input folder.
"""
from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .config import MarkConfig
from .images import list_images, read_rgb, write_png
from .mark import ood_pool
from .marking import make_pattern, mark_batch, resolve_device
from .plan import child_seed
from .store import StageError, file_sha256, write_json

KEY_NAME = "membership-key.json"
KEY_FORMAT = "mtrack-key/1"


def fit_to_grid(image: np.ndarray, max_resolution: int | None) -> np.ndarray:
    """Shrink so the longer side is at most `max_resolution`, as FFCV's writer does before storing
    (INTER_AREA, aspect kept), so the mark lands on the pixels a model will be trained on."""
    h, w = image.shape[:2]
    if max_resolution is None or max(h, w) <= max_resolution:
        return image
    ratio = max_resolution / max(h, w)
    return cv2.resize(image, (int(w * ratio), int(h * ratio)), interpolation=cv2.INTER_AREA)


def _check_folders(src: Path, out: Path, force: bool) -> None:
    src, out = src.resolve(), out.resolve()
    if not src.is_dir():
        raise StageError(f"{src}: input folder not found")
    if out == src or src in out.parents or out in src.parents:
        raise StageError(f"{out}: the output folder must be separate from the input folder {src} "
                         "(marking never overwrites originals)")
    if (out / KEY_NAME).exists() and not force:
        raise StageError(f"{out / KEY_NAME}: a key already exists here; choose another --out or pass --force")


def mark_folder(src: str | Path, out: str | Path, cfg: MarkConfig, seed: int | None = None,
                max_resolution: int | None = None, force: bool = False) -> dict[str, Any]:
    """Mark every image under `src` into `out`; returns the key (also written to `out`)."""
    src, out = Path(src), Path(out)
    _check_folders(src, out, force)
    files = list_images(src)
    if not files:
        raise StageError(f"{src}: no image files found")
    targets: dict[Path, Path] = {}
    for rel in files:
        target = rel.with_suffix(".png")
        if target in targets:
            raise StageError(f"{src / rel}: would write the same {target} as {src / targets[target]}; rename one")
        targets[target] = rel
    seed = secrets.randbits(63) if seed is None else seed
    pattern_seed = child_seed(seed, 1, 0)
    pool, device = ood_pool(cfg, 224), resolve_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for target, rel in targets.items():
        image = fit_to_grid(read_rgb(src / rel), max_resolution)
        original_sha = file_sha256(src / rel)
        noise_seed = child_seed(pattern_seed, 2, int(original_sha[:15], 16))
        h, w = image.shape[:2]
        pattern = make_pattern(cfg, pattern_seed, h, w, pool)
        marked = mark_batch(image[None], pattern, np.array([noise_seed], np.uint64), cfg, device)[0]
        write_png(out / target, marked)
        entries.append({"original": rel.as_posix(), "original_sha256": original_sha, "marked": target.as_posix(),
                        "marked_sha256": file_sha256(out / target), "noise_seed": noise_seed, "height": h, "width": w})
    key = {
        "format": KEY_FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_folder": str(src.resolve()),
        "seed": seed,
        "pattern_seed": pattern_seed,
        "max_resolution": max_resolution,
        "mark": cfg.model_dump(mode="json"),
        "files": entries,
    }
    write_json(out / KEY_NAME, key)
    os.chmod(out / KEY_NAME, 0o600)  # the seed is the owner's secret
    return key
