"""Auditing a model for the owner's own images (`mtrack audit --model M --user FOLDER`)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MarkConfig
from ..core.marking import resolve_device
from ..core.models import Normalized, build_model, load_weights, read_checkpoint
from ..core.scoring import logit_margin
from ..data.images import read_rgb
from ..data.ood import ood_pool
from ..store import StageError, file_sha256
from .marking import candidate_pattern_seed, fit_to_grid, mark_image


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
