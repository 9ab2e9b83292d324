"""A data owner's own marking: `mtrack mark <folder> --out <folder>`.

Reads every image in a folder (any size or format; grey, RGBA, 16-bit, palette and EXIF-rotated
images become upright RGB), marks the ones its design publishes (by default a random tenth, see
`owner.designs`) and writes them as lossless PNG copies, plus a private key file holding what a
later audit needs: the design, the seed, the parameters and the hashes of every original and
marked file. Originals are never touched: the output folder may not be, contain, or sit inside the
input folder. Nothing is written unless every image reads and no file appears twice (a duplicate
would count twice in the audit's mean loss).
"""
from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..config import MarkConfig
from ..core.marking import make_pattern, mark_batch, resolve_device
from ..core.seeds import child_seed
from ..data.images import list_images, read_rgb, write_png
from ..data.ood import ood_pool
from ..store import StageError, file_sha256, write_json
from .designs import DesignParams, published_candidate
from .key import KEY_FORMAT, KEY_NAME


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
    if (src / KEY_NAME).exists():
        raise StageError(f"{src}: holds a {KEY_NAME}, so it is already marked; mark your originals instead")
    if (out / KEY_NAME).exists() and not force:
        raise StageError(f"{out / KEY_NAME}: a key already exists here; choose another --out or pass --force")


def mark_images(images: list[np.ndarray], shas: list[str], pattern_seed: int, cfg: MarkConfig, pool: Any,
                device: str | None) -> list[np.ndarray]:
    """The images marked with one pattern, batched by size; each image's noise is seeded by the
    pattern and its original file's hash, so re-marking at audit time reproduces it exactly."""
    out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for (h, w, _), members in by_shape.items():
        noise = np.array([child_seed(pattern_seed, 2, int(shas[i][:15], 16)) for i in members], np.uint64)
        marked = mark_batch(np.stack([images[i] for i in members]), make_pattern(cfg, pattern_seed, h, w, pool), noise,
                            cfg, device)
        for i, image in zip(members, marked):
            out[i] = image
    return out


def mark_folder(src: str | Path, out: str | Path, cfg: MarkConfig, seed: int | None = None,
                max_resolution: int | None = None, force: bool = False, label: int | None = None,
                params: DesignParams = DesignParams()) -> dict[str, Any]:
    """Mark the published images of `src` into `out`; returns the key (also written to `out`).

    The design (`owner.designs`) decides which images are published and with which pattern; the key
    lists every original (the audit re-marks the unpublished ones too) with its hash, and the marked
    copy of each published one."""
    src, out = Path(src), Path(out)
    _check_folders(src, out, force)
    files = list_images(src)
    if not files:
        raise StageError(f"{src}: no image files found")
    hashes: dict[Path, str] = {}
    first_with_hash: dict[str, Path] = {}
    targets: dict[Path, Path] = {}
    images = []
    for rel in files:
        target = rel.with_suffix(".png")
        if target in targets:
            raise StageError(f"{src / rel}: would write the same {target} as {src / targets[target]}; rename one")
        targets[target] = rel
        images.append(fit_to_grid(read_rgb(src / rel), max_resolution))  # every image reads before anything is written
        hashes[rel] = file_sha256(src / rel)
        if hashes[rel] in first_with_hash:  # it would count twice in the audit's mean loss
            raise StageError(f"{src / rel}: the same file as {src / first_with_hash[hashes[rel]]}; keep one")
        first_with_hash[hashes[rel]] = rel
    params.check(len(files))
    seed = secrets.randbits(63) if seed is None else seed
    published, design_fields = published_candidate(params, seed, len(files))
    pool, device = ood_pool(cfg, 224), resolve_device(cfg.device)
    marked = mark_images([images[i] for i in published.files], [hashes[files[i]] for i in published.files],
                         published.pattern_seed, cfg, pool, device)
    out.mkdir(parents=True, exist_ok=True)
    entries = [{"original": rel.as_posix(), "original_sha256": hashes[rel], "height": images[i].shape[0],
                "width": images[i].shape[1]} for i, rel in enumerate(files)]
    for i, image in zip(published.files, marked):
        target = files[i].with_suffix(".png")
        write_png(out / target, image)
        entries[i].update(marked=target.as_posix(), marked_sha256=file_sha256(out / target))
    key = {
        "format": KEY_FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_folder": str(src.resolve()),
        "design": params.design,
        "seed": seed,
        "published": list(published.files),
        **design_fields,
        "label": label,
        "max_resolution": max_resolution,
        "mark": cfg.model_dump(mode="json"),
        "files": entries,
    }
    write_json(out / KEY_NAME, key)
    os.chmod(out / KEY_NAME, 0o600)  # the seed is the owner's secret
    return key
