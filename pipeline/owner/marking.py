"""A data owner's own marking: `mtrack mark <folder> --out <folder>`.

Marks every image in a folder (any size or format; grey, RGBA, 16-bit, palette and EXIF-rotated
images become upright RGB) and writes lossless PNG copies plus a private key file holding what a
later audit needs: the seed, the pattern, the parameters and the hashes of every original and
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

import numpy as np

from ..config import MarkConfig
from ..core.marking import make_pattern, mark_batch, resolve_device
from ..core.seeds import child_seed
from ..data.images import fit_to_grid, list_images, read_rgb, write_png
from ..data.ood import ood_pool
from ..store import StageError, file_sha256, write_json
from .key import KEY_FORMAT, KEY_NAME


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


def candidate_pattern_seed(seed: int, index: int) -> int:
    """Pattern seed of candidate `index` of the owner's M + 1 secret candidates."""
    return child_seed(seed, 1, index)


def mark_image(image: np.ndarray, original_sha: str, pattern_seed: int, cfg: MarkConfig, pool: Any,
               device: str | None) -> np.ndarray:
    """One image marked with one candidate pattern; its noise is seeded by the pattern and the
    original file's hash, so re-marking at audit time reproduces it exactly."""
    noise_seed = child_seed(pattern_seed, 2, int(original_sha[:15], 16))
    pattern = make_pattern(cfg, pattern_seed, image.shape[0], image.shape[1], pool)
    return mark_batch(image[None], pattern, np.array([noise_seed], np.uint64), cfg, device)[0]


def mark_folder(src: str | Path, out: str | Path, cfg: MarkConfig, seed: int | None = None,
                max_resolution: int | None = None, force: bool = False, n_patterns: int = 100,
                label: int | None = None) -> dict[str, Any]:
    """Mark every image under `src` into `out`; returns the key (also written to `out`).

    Secret-pattern design: the seed defines `n_patterns` candidate patterns and secretly picks one;
    only that one is published. At audit time the same originals are scored under every candidate,
    and under the null (the model never saw them) the published one is exchangeable with the rest,
    so its rank is an exact p-value with resolution 1 / n_patterns."""
    src, out = Path(src), Path(out)
    _check_folders(src, out, force)
    files = list_images(src)
    if not files:
        raise StageError(f"{src}: no image files found")
    targets: dict[Path, Path] = {}
    hashes: dict[Path, str] = {}
    first_with_hash: dict[str, Path] = {}
    for rel in files:
        target = rel.with_suffix(".png")
        if target in targets:
            raise StageError(f"{src / rel}: would write the same {target} as {src / targets[target]}; rename one")
        read_rgb(src / rel)  # every image must read before anything is written
        targets[target], hashes[rel] = rel, file_sha256(src / rel)
        if hashes[rel] in first_with_hash:  # it would count twice in the audit's mean loss
            raise StageError(f"{src / rel}: the same file as {src / first_with_hash[hashes[rel]]}; keep one")
        first_with_hash[hashes[rel]] = rel
    if n_patterns < 2:
        raise StageError(f"--n-patterns {n_patterns}: need at least 2 candidate patterns for a p-value")
    seed = secrets.randbits(63) if seed is None else seed
    pattern_index = int(np.random.default_rng(child_seed(seed, 3)).integers(n_patterns))
    pattern_seed = candidate_pattern_seed(seed, pattern_index)
    pool, device = ood_pool(cfg, 224), resolve_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for target, rel in targets.items():
        image = fit_to_grid(read_rgb(src / rel), max_resolution)
        original_sha = hashes[rel]
        write_png(out / target, mark_image(image, original_sha, pattern_seed, cfg, pool, device))
        entries.append({"original": rel.as_posix(), "original_sha256": original_sha, "marked": target.as_posix(),
                        "marked_sha256": file_sha256(out / target), "height": image.shape[0],
                        "width": image.shape[1]})
    key = {
        "format": KEY_FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_folder": str(src.resolve()),
        "seed": seed,
        "n_patterns": n_patterns,
        "pattern_index": pattern_index,
        "label": label,
        "max_resolution": max_resolution,
        "mark": cfg.model_dump(mode="json"),
        "files": entries,
    }
    write_json(out / KEY_NAME, key)
    os.chmod(out / KEY_NAME, 0o600)  # the seed is the owner's secret
    return key
