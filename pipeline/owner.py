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
import importlib
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .config import MarkConfig
from .images import list_images, read_rgb, write_png
from .mark import ood_pool
from .marking import make_pattern, mark_batch, resolve_device
from .models import Normalized, build_model, load_weights, read_checkpoint
from .plan import child_seed
from .audit import logit_margin
from .store import StageError, file_sha256, read_json, write_json

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


def load_key(key_path: str | Path, marked_folder: str | Path) -> dict[str, Any]:
    """Read a key (plain JSON, nothing executed) and check it was made for `marked_folder`."""
    key = read_json(key_path)
    if key.get("format") != KEY_FORMAT:
        raise StageError(f"{key_path}: not a {KEY_FORMAT} key file")
    for entry in key["files"]:
        path = Path(marked_folder) / entry["marked"]
        if not path.is_file() or file_sha256(path) != entry["marked_sha256"]:
            raise StageError(f"{key_path}: made for another folder ({path} is missing or differs)")
    return key


Predict = Callable[[torch.Tensor], torch.Tensor]


def audit_owner(key: dict[str, Any], predict: Predict, originals: str | Path | None = None,
                label: int | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Score the owner's originals under every candidate pattern with `predict` (uint8 NCHW images ->
    logits: a loaded model or any black-box callable) and rank the published pattern's mean loss."""
    folder = Path(originals or key["source_folder"])
    label = key.get("label") if label is None else label
    if label is None:
        raise StageError("audit: the key has no class label; pass --label (the class of your images)")
    images, hashes = [], []
    for entry in key["files"]:
        path = folder / entry["original"]
        if not path.is_file() or file_sha256(path) != entry["original_sha256"]:
            raise StageError(f"{path}: missing or not the original the key was made from (pass --originals)")
        images.append(fit_to_grid(read_rgb(path), key["max_resolution"]))
        hashes.append(entry["original_sha256"])
    cfg = MarkConfig.model_validate(key["mark"])
    pool, device = ood_pool(cfg, 224), resolve_device(cfg.device)
    mean_loss = np.empty(key["n_patterns"])
    for j in range(key["n_patterns"]):
        seed_j = candidate_pattern_seed(key["seed"], j)
        marked = [mark_image(im, sha, seed_j, cfg, pool, device) for im, sha in zip(images, hashes)]
        losses = [per_image_losses(predict, np.stack(group), label, batch_size) for group in _same_size(marked)]
        mean_loss[j] = float(np.concatenate(losses).mean())
    chosen = key["pattern_index"]
    others = np.delete(mean_loss, chosen)
    p_value = (1 + int((others <= mean_loss[chosen]).sum())) / key["n_patterns"]
    return {"p_value": p_value, "smallest_possible_p_value": 1 / key["n_patterns"], "n_images": len(images),
            "published_pattern_loss": float(mean_loss[chosen]),
            "other_patterns_loss": {"min": float(others.min()), "median": float(np.median(others))}}


def _same_size(images: list[np.ndarray]) -> list[list[np.ndarray]]:
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    for im in images:
        groups.setdefault(im.shape, []).append(im)
    return list(groups.values())


@torch.no_grad()
def per_image_losses(predict: Predict, images: np.ndarray, label: int, batch_size: int) -> np.ndarray:
    """fp32 cross-entropy of each (H, W, 3) uint8 image for `label`, computed from the logit margin."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).contiguous()
        logits = predict(batch).float().cpu()
        out.append(F.softplus(-logit_margin(logits, torch.full((len(batch),), label))).numpy())
    return np.concatenate(out)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_predictor(spec: str, arch: str | None = None, num_classes: int | None = None) -> Predict:
    """`spec` is a checkpoint file (this pipeline's model.pt, or a plain state_dict given --arch and
    --num-classes, normalised with ImageNet statistics), loaded as weights only; or `module:function`,
    a black-box callable taking uint8 NCHW images and returning logits."""
    path = Path(spec)
    if not path.exists() and ":" in spec:
        module, name = spec.split(":", 1)
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise StageError(f"--model {spec}: cannot import the callable ({exc})") from None
    blob = read_checkpoint(path)
    if isinstance(blob, dict) and "meta" in blob:
        return load_weights(path)[0]
    if arch is None or num_classes is None:
        raise StageError(f"{path}: a plain state_dict; pass --arch and --num-classes")
    model = Normalized(build_model(arch, num_classes), IMAGENET_MEAN, IMAGENET_STD)
    try:
        model.net.load_state_dict(blob.get("state_dict", blob))
    except (RuntimeError, AttributeError, TypeError) as exc:
        raise StageError(f"{path}: does not fit --arch {arch} ({str(exc).splitlines()[0]})") from None
    return model.eval()
