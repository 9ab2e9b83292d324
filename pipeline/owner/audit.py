"""Auditing a model for the owner's own images (`mtrack audit --model M --user FOLDER`)."""
from __future__ import annotations

import importlib
import secrets
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MarkConfig
from ..core.marking import resolve_device
from ..core.models import Normalized, build_model, load_weights, read_checkpoint
from ..core.scoring import logit_margin
from ..core.stats import rank_p_values
from ..data.images import read_rgb
from ..data.ood import ood_pool
from ..store import StageError, file_sha256
from .designs import Candidate, null_candidates, published_pattern_seed
from .marking import fit_to_grid, mark_images


Predict = Callable[[torch.Tensor], torch.Tensor]


def audit_owner(key: dict[str, Any], predict: Predict, originals: str | Path | None = None,
                label: int | None = None, draws_seed: int | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Rank the published candidate's mean loss among the design's other candidates (each of the
    owner's originals re-marked as that candidate says), scored with `predict` (uint8 NCHW images ->
    logits: a loaded model or any black-box callable). `draws_seed` (subset design) defaults to
    fresh randomness, reported with the result so the audit can be repeated exactly."""
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
    draws_seed = secrets.randbits(63) if draws_seed is None else draws_seed
    published = Candidate(tuple(key["published"]), published_pattern_seed(key))
    losses = candidate_mean_losses([published, *null_candidates(key, draws_seed)], images, hashes, cfg, pool,
                                   device, predict, label, batch_size)
    observed, null = losses[0], losses[1:]
    p_value = float(rank_p_values(np.array([-observed]), -null)[0])  # higher score = more member-like
    return {"design": key["design"], "p_value": p_value, "smallest_possible_p_value": 1 / (len(null) + 1),
            "n_images": len(published.files), "n_originals": len(images), "n_candidates": len(null),
            "draws_seed": draws_seed if key["design"] == "subset" else None, "published_loss": observed,
            "candidates_loss": {"min": float(null.min()), "median": float(np.median(null))}}


def candidate_mean_losses(candidates: list[Candidate], images: list[np.ndarray], hashes: list[str], cfg: MarkConfig,
                          pool: Any, device: str | None, predict: Predict, label: int, batch_size: int) -> np.ndarray:
    """Each candidate's mean loss over its images marked with its pattern. Images of several
    candidates share a forward pass (full batches matter on a busy CPU), and only about a batch per
    image size is held at a time, whatever the number of candidates."""
    totals, counts = np.zeros(len(candidates)), np.zeros(len(candidates))
    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}

    def score(shape: tuple[int, ...]) -> None:
        owners, batch = zip(*pending.pop(shape))
        np.add.at(totals, list(owners), per_image_losses(predict, np.stack(batch), label, batch_size))
        np.add.at(counts, list(owners), 1)

    for index, candidate in enumerate(candidates):
        marked = mark_images([images[i] for i in candidate.files], [hashes[i] for i in candidate.files],
                             candidate.pattern_seed, cfg, pool, device)
        for image in marked:
            pending.setdefault(image.shape, []).append((index, image))
            if len(pending[image.shape]) >= batch_size:
                score(image.shape)
    for shape in list(pending):
        score(shape)
    return totals / counts


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
