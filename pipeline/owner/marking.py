"""A data owner's own marking: `mtrack mark <folder> --out <folder>`.

Marks every image in a folder (any size or format; grey, RGBA, 16-bit, palette and EXIF-rotated
images become upright RGB) and writes lossless PNG copies plus a private key file holding what a
later audit needs: the seed, the pattern, the parameters and the hashes of every original and
marked file. Originals are never touched: the output folder may not be, contain, or sit inside the
input folder. Nothing is published unless every image reads, is large enough and appears once (a
duplicate would count twice in the audit's mean loss), and every marked copy and the key were
written: they are written into a hidden folder next to (or inside) the output folder and moved
into place at the end, so a failure midway leaves no marked file and no key behind.
"""
from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydantic import ConfigDict, validate_call

from ..config import MarkConfig
from ..core.marking import make_pattern, mark_batch, resolve_device
from ..core.seeds import child_seed
from ..data.images import fit_to_grid, grid_size, list_images, read_rgb, write_png
from ..data.ood import ood_pool
from ..store import StageError, file_sha256, first_line, write_json
from .key import (KEY_FORMAT, KEY_NAME, MIN_SIDE, ClassLabel, PatternCount, Resolution, Seed, secret_pattern_index,
                  validate_key)


def _check_folders(src: Path, out: Path, force: bool) -> None:
    src, out = src.resolve(), out.resolve()
    if not src.is_dir():
        raise StageError(f"{src}: input folder {'is a file' if src.exists() else 'not found'}")
    blocked = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise StageError(f"{out}: cannot be the output folder: {'it is' if blocked == out else 'it lies under'} "
                         f"the file {blocked}")
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


def _check_images(src: Path, max_resolution: int | None) -> dict[Path, tuple[Path, str]]:
    """Marked name -> (original, its SHA-256) for every image under `src`, once each has been read
    and found usable; nothing is written before this returns."""
    files = list_images(src)
    if not files:
        raise StageError(f"{src}: no image files found")
    targets: dict[Path, tuple[Path, str]] = {}
    first_with_hash: dict[str, Path] = {}
    for rel in files:
        target = rel.with_suffix(".png")
        if target in targets:
            raise StageError(f"{src / rel}: would write the same {target} as {src / targets[target][0]}; rename one")
        h, w = read_rgb(src / rel).shape[:2]
        size = grid_size(h, w, max_resolution)
        if min(size) < MIN_SIDE:
            shrunk = f" ({size[0]}x{size[1]} after --max-resolution {max_resolution})" if size != (h, w) else ""
            raise StageError(f"{src / rel}: {h}x{w} pixels{shrunk} is too small to mark: every side needs at "
                             f"least {MIN_SIDE} pixels")
        digest = file_sha256(src / rel)
        if digest in first_with_hash:  # it would count twice in the audit's mean loss
            raise StageError(f"{src / rel}: the same file as {src / first_with_hash[digest]}; keep one")
        targets[target], first_with_hash[digest] = (rel, digest), rel
    return targets


@contextmanager
def _publishing(out: Path) -> Iterator[Path]:
    """A new hidden folder to write the marked copies and the key into. When the block succeeds
    its files appear in `out` (the folder is renamed to `out` when `out` is new; otherwise its files
    are moved in, the key last); when it fails, it is deleted with every folder this created."""
    out = out.absolute()
    created = [p for p in reversed(out.parents) if not p.exists()]
    staging = (out if out.is_dir() else out.parent) / f".{out.name}.marking-{secrets.token_hex(4)}"
    try:
        for folder in [*created, staging]:
            folder.mkdir()  # mode 0o777 less the umask: the published folder is as readable as any other
    except OSError as exc:
        _remove(staging, created)
        raise StageError(f"{out}: cannot write the marked copies here ({exc.strerror or first_line(exc)})") from None
    try:
        yield staging
        if not out.exists():
            staging.rename(out)
            return
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == KEY_NAME)
        for file in files:
            target = out / file.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
        shutil.rmtree(staging)
    except OSError as exc:
        _remove(staging, created)
        raise StageError(f"{out}: writing the marked copies failed ({exc.strerror or first_line(exc)}); "
                         "nothing was published") from None
    except BaseException:
        _remove(staging, created)
        raise


def _remove(staging: Path, created: list[Path]) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


@validate_call(config=ConfigDict(arbitrary_types_allowed=True))
def mark_folder(src: str | Path, out: str | Path, cfg: MarkConfig, seed: Seed | None = None,
                max_resolution: Resolution | None = None, force: bool = False, n_patterns: PatternCount = 100,
                label: ClassLabel | None = None) -> dict[str, Any]:
    """Mark every image under `src` into `out`; returns the key (also written to `out`).

    Secret-pattern design: the seed defines `n_patterns` candidate patterns and secretly picks one;
    only that one is published. At audit time the same originals are scored under every candidate,
    and under the null (the model never saw them) the published one is exchangeable with the rest,
    so its rank is an exact p-value with resolution 1 / n_patterns. The options are validated
    against the same bounds as the key file (pydantic), before anything is read."""
    src, out = Path(src), Path(out)
    _check_folders(src, out, force)
    pool, device = ood_pool(cfg, 224), resolve_device(cfg.device)
    seed = secrets.randbits(63) if seed is None else seed
    pattern_index = secret_pattern_index(seed, n_patterns)
    pattern_seed = candidate_pattern_seed(seed, pattern_index)
    with _publishing(out) as staging:
        targets = _check_images(src, max_resolution)
        entries = []
        for target, (rel, original_sha) in targets.items():
            image = fit_to_grid(read_rgb(src / rel), max_resolution)
            write_png(staging / target, mark_image(image, original_sha, pattern_seed, cfg, pool, device))
            entries.append({"original": rel.as_posix(), "original_sha256": original_sha,
                            "marked": target.as_posix(), "marked_sha256": file_sha256(staging / target),
                            "height": image.shape[0], "width": image.shape[1]})
        key = validate_key(_key(src, cfg, seed, n_patterns, pattern_index, label, max_resolution, entries), KEY_NAME)
        write_json(staging / KEY_NAME, key, mode=0o600)  # the seed is the owner's secret
    return key


def _key(src: Path, cfg: MarkConfig, seed: int, n_patterns: int, pattern_index: int, label: int | None,
         max_resolution: int | None, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
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
