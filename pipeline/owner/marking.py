"""A data owner's own marking: `mtrack owner mark <folder> --out <folder>`.

Reads every image in a folder (any size or format; grey, RGBA, 16-bit, palette and EXIF-rotated
images become upright RGB), marks the ones its design publishes (by default a random tenth, see
`owner.designs`) and writes them as lossless PNG copies, plus a private key file holding what a
later audit needs: the design, the seed, the parameters and the hashes of every original and
marked file. Originals are never touched: the output folder may not be, contain, or sit inside the
input folder. Nothing is published unless every image reads, is large enough and appears once (a
duplicate would count twice in the audit's mean loss), and every marked copy and the key were
written: they are written into a hidden folder next to (or inside) the output folder and moved
into place at the end, so a failure midway leaves no marked file and no key behind. A run killed
outright (SIGKILL) cannot remove its hidden folder; the next run into the same output folder does.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, validate_call

from ..config import MarkConfig
from ..core.marking import make_pattern, mark_batch, resolve_device, shape_groups
from ..core.seeds import child_seed
from ..data.images import fit_to_grid, grid_size, list_images, read_rgb, write_png
from ..data.ood import ood_pool
from ..store import StageError, file_sha256, first_line, write_json
from .designs import DesignParams, published_candidate
from .key import KEY_FORMAT, KEY_NAME, MIN_SIDE, ClassLabel, Resolution, Seed, validate_key


def _check_folders(src: Path, out: Path, force: bool) -> None:
    src, out = src.resolve(), out.resolve()
    if not src.is_dir():
        raise StageError(f"{src}: input folder {'is a file' if src.exists() else 'not found'}")
    blocked = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise StageError(
            f"{out}: cannot be the output folder: {'it is' if blocked == out else 'it lies under'} the file {blocked}"
        )
    if out == src or src in out.parents or out in src.parents:
        raise StageError(
            f"{out}: the output folder must be separate from the input folder {src} "
            "(marking never overwrites originals)"
        )
    if (src / KEY_NAME).exists():
        raise StageError(f"{src}: holds a {KEY_NAME}, so it is already marked; mark your originals instead")
    if (out / KEY_NAME).exists() and not force:
        raise StageError(f"{out / KEY_NAME}: a key already exists here; choose another --out or pass --force")


def mark_images(
    images: list[np.ndarray],
    shas: list[str],
    pattern_seed: int,
    cfg: MarkConfig,
    pool: Any,
    device: str | None,
    channels_first: bool = False,
) -> list[np.ndarray]:
    """The (H, W, 3) images marked with one pattern, batched by size; each image's noise is seeded
    by the pattern and its original file's hash, so re-marking at audit time reproduces it exactly.
    With `channels_first` each comes back (3, H, W), the layout a model scores."""
    out = list(images)
    for group in shape_groups(images):
        h, w = images[group[0]].shape[:2]
        noise = np.array([child_seed(pattern_seed, 2, int(shas[i][:15], 16)) for i in group], np.uint64)
        pattern = make_pattern(cfg, pattern_seed, h, w, pool)
        marked = mark_batch(np.stack([images[i] for i in group]), pattern, noise, cfg, device, channels_first)
        for i, image in zip(group, marked):
            out[i] = image
    return out


def _check_images(src: Path, max_resolution: int | None) -> dict[Path, tuple[Path, str, tuple[int, int]]]:
    """Marked name -> (original, its SHA-256, its size on the grid) for every image under `src`,
    once each has been read and found usable; nothing is written before this returns."""
    files = list_images(src)
    if not files:
        raise StageError(f"{src}: no image files found")
    targets: dict[Path, tuple[Path, str, tuple[int, int]]] = {}
    first_with_hash: dict[str, Path] = {}
    for rel in files:
        target = rel.with_suffix(".png")
        if target in targets:
            raise StageError(f"{src / rel}: would write the same {target} as {src / targets[target][0]}; rename one")
        h, w = read_rgb(src / rel).shape[:2]
        size = grid_size(h, w, max_resolution)
        if min(size) < MIN_SIDE:
            shrunk = f" ({size[0]}x{size[1]} after --max-resolution {max_resolution})" if size != (h, w) else ""
            raise StageError(
                f"{src / rel}: {h}x{w} pixels{shrunk} is too small to mark: every side needs at least {MIN_SIDE} pixels"
            )
        digest = file_sha256(src / rel)
        if digest in first_with_hash:  # it would count twice in the audit's mean loss
            raise StageError(f"{src / rel}: the same file as {src / first_with_hash[digest]}; keep one")
        targets[target], first_with_hash[digest] = (rel, digest, size), rel
    return targets


STAGING = ".{name}.marking-{token}"  # token: 8 hex digits


@contextmanager
def _publishing(out: Path) -> Iterator[Path]:
    """A new hidden folder to write the marked copies and the key into. When the block succeeds
    its files appear in `out` (the folder is renamed to `out` when `out` is new; otherwise its files
    are moved in, the key last); when it fails, it is deleted with every folder this created. The
    folder is locked (flock) while this run lives, so the hidden folders of killed runs are told
    from those of a run still marking, and removed first."""
    out = out.absolute()
    created = [p for p in reversed(out.parents) if not p.exists()]
    home = out if out.is_dir() else out.parent
    _remove_stale_staging(out)
    staging = home / STAGING.format(name=out.name, token=secrets.token_hex(4))
    lock = None
    try:
        for folder in [*created, staging]:
            folder.mkdir()  # mode 0o777 less the umask: the published folder is as readable as any other
        lock = _lock(staging)  # (a window of a few instructions before it, in which another run could take it)
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
        raise StageError(
            f"{out}: writing the marked copies failed ({exc.strerror or first_line(exc)}); nothing was published"
        ) from None
    except BaseException:
        _remove(staging, created)
        raise
    finally:
        if lock is not None:
            os.close(lock)  # releases the flock


def _lock(folder: Path) -> int | None:
    """An exclusive flock on `folder`, held until the returned descriptor is closed (or the process
    dies); None when another live process holds it, or it cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a live run holds it
        os.close(fd)
        return None
    return fd


def _remove_stale_staging(out: Path) -> None:
    """Delete the hidden folders that killed runs of `mtrack owner mark --out out` left (inside `out`
    and next to it): only ours by name, and only unlocked ones, so a run still marking keeps its."""
    pattern = re.compile(re.escape(STAGING.format(name=out.name, token="")) + "[0-9a-f]{8}")
    for home in {out, out.parent}:
        if not home.is_dir():
            continue
        for folder in home.iterdir():
            if pattern.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink():
                if (fd := _lock(folder)) is not None:
                    try:
                        shutil.rmtree(folder, ignore_errors=True)
                    finally:
                        os.close(fd)


def _remove(staging: Path, created: list[Path]) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


@validate_call(config=ConfigDict(arbitrary_types_allowed=True))
def mark_folder(
    src: str | Path,
    out: str | Path,
    cfg: MarkConfig,
    seed: Seed | None = None,
    max_resolution: Resolution | None = None,
    force: bool = False,
    label: ClassLabel | None = None,
    params: DesignParams = DesignParams(),
) -> dict[str, Any]:
    """Mark the published images of `src` into `out`; returns the key (also written to `out`).

    The design (`owner.designs`) decides from the seed which images are published and with which
    pattern; the key lists every original (the audit re-marks the unpublished ones too) with its
    hash, and the marked copy of each published one. The options are validated against the same
    bounds as the key file (pydantic), before anything is read."""
    src, out = Path(src), Path(out)
    _check_folders(src, out, force)
    pool, device = ood_pool(cfg, 224), resolve_device(cfg.device)
    seed = secrets.randbits(63) if seed is None else seed
    with _publishing(out) as staging:
        targets = list(_check_images(src, max_resolution).items())
        params.check(len(targets))
        published, design_fields = published_candidate(params, seed, len(targets))
        entries = [
            {"original": rel.as_posix(), "original_sha256": sha, "height": size[0], "width": size[1]}
            for _, (rel, sha, size) in targets
        ]
        images = [fit_to_grid(read_rgb(src / targets[i][1][0]), max_resolution) for i in published.files]
        marked = mark_images(
            images, [entries[i]["original_sha256"] for i in published.files], published.pattern_seed, cfg, pool, device
        )
        for i, image in zip(published.files, marked):
            target = targets[i][0]
            write_png(staging / target, image)
            entries[i].update(marked=target.as_posix(), marked_sha256=file_sha256(staging / target))
        key = validate_key(
            {
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
            },
            KEY_NAME,
        )
        write_json(staging / KEY_NAME, key, mode=0o600)  # the seed is the owner's secret
    return key
