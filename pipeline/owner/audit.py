"""Auditing a model for the owner's own images (`mtrack owner audit --model M --user FOLDER`)."""

from __future__ import annotations

import importlib
import os
import secrets
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import ConfigDict, Field, validate_call

from ..config import MarkConfig
from ..core.marking import resolve_device
from ..core.models import MODELS, Normalized, build_model, load_fitting, load_weights, read_checkpoint
from ..core.stats import sequential_design, sequential_p_value
from ..data.images import fit_to_grid, read_rgb
from ..data.ood import ood_pool
from ..store import StageError, file_sha256, first_line
from .access import Access
from .designs import Candidate, null_candidates, published_pattern_seed, smallest_p_value
from .key import ClassCount, ClassLabel, Seed, validate_key
from .marking import mark_images

Predict = Callable[[torch.Tensor], torch.Tensor]


class Predictor:
    """A model or black-box callable as the audit uses it (uint8 NCHW images -> what its access level
    returns: logits, probabilities, the top K, or labels; `owner.access`): whatever it raises, and any
    output that is not what the level promises, ends in one line naming it, never in a traceback or
    a p-value computed from garbage. With `restrict`, the callable returns logits and the predictor
    passes on only what an API at the level would (a trained network audited at each level)."""

    def __init__(self, fn: Predict, name: str, access: Access = Access(), restrict: bool = False) -> None:
        self.fn, self.name, self.access, self.restrict = fn, name, access, restrict
        self.queries = 0  # images sent to the model so far

    def __call__(self, batch: torch.Tensor) -> Any:
        n, _, h, w = batch.shape
        self.queries += n
        try:
            out = self.fn(batch)
            if self.restrict:
                out = self.access.restrict(Access().check(out, n, self.name))
        except StageError:
            raise
        except (Exception, SystemExit) as exc:  # the callable is the user's code: report whatever it raised
            images = f"{n} image{'' if n == 1 else 's'}"
            raise StageError(f"{self.name}: failed on {images} of {h}x{w} pixels ({_raised(exc)})") from None
        return self.access.check(out, n, self.name)


@validate_call(config=ConfigDict(arbitrary_types_allowed=True))
def audit_owner(
    key: dict[str, Any],
    predict: Predict,
    originals: str | Path | None = None,
    label: ClassLabel | None = None,
    draws_seed: Seed | None = None,
    batch_size: Annotated[int, Field(ge=1)] = 256,
    key_source: str = "the key",
    alpha: Annotated[float, Field(gt=0, le=1)] | None = None,
    marked_folder: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
    all_draws: bool = False,
) -> dict[str, Any]:
    """Rank the published candidate's mean loss among the design's other candidates (each of the
    owner's originals re-marked as that candidate says), scored with `predict` (uint8 NCHW images ->
    logits: a loaded model or any black-box callable). `draws_seed` (subset design) defaults to
    fresh randomness, reported with the result so the audit can be repeated exactly. The key is
    validated first (`load_key` has done so for a key file): nothing is computed from an invalid
    one. `key_source` names the key in messages about its fields. With `alpha` and `notify`, an audit
    whose smallest possible p-value lies above that level says so before anything is scored (no
    verdict "trained on" can follow; the p-value is still computed).
    With `alpha`, candidates are scored a batch at a time and scoring stops once the verdict is clear
    (`sequential_design`): enough of them score at least as low as the published one for p to lie
    above `alpha` (Besag-Clifford), or none of the first `early` does (p = 1 / (early + 1) <= alpha / 10);
    the p-value stays exact. `all_draws` scores every candidate.
    With `marked_folder` (the published copies), the key proves what it claims first: its published
    originals, re-marked under its settings, must be those copies pixel for pixel."""
    key = validate_key(key, key_source)
    predict = predict if isinstance(predict, Predictor) else Predictor(predict, "the model")
    folder = Path(originals or key["source_folder"])
    label_name = "--label" if label is not None else f"{key_source}: label"
    label = key["label"] if label is None else label
    if label is None:
        raise StageError(f"{key_source}: holds no class label; pass --label (the class of your images)")
    if not folder.is_dir():
        where = f"--originals {folder}" if originals else f"{key_source}: source_folder {folder}"
        raise StageError(
            f"{where}: {'not a folder' if folder.exists() else 'folder not found'}; pass --originals "
            "FOLDER (your original images)"
        )
    images, hashes = read_originals(key, folder)
    cfg = MarkConfig.model_validate(key["mark"])
    pool, device = ood_pool(cfg, 224), resolve_device(cfg.device)
    draws_seed = secrets.randbits(63) if draws_seed is None else draws_seed
    published = Candidate(tuple(key["published"]), published_pattern_seed(key))
    candidates = null_candidates(key, draws_seed)
    floor = smallest_p_value(published, candidates)
    if alpha is not None and notify is not None and floor > alpha:
        notify(
            f"the smallest p-value this audit can reach is {floor:.4g}, above the level {alpha}: "
            f"{len(key['files'])} images, {len(published.files)} published, leave too few distinct candidates "
            "for a verdict 'trained on' (mark a larger folder, or audit at a higher level)"
        )
    probe = np.ascontiguousarray(images[0].transpose(2, 0, 1)[None])
    per_image_losses(predict, probe, label, 1, label_name)  # one image: its classes and input, before marking
    if marked_folder is not None:
        check_key_makes_published(key, published, images, hashes, cfg, pool, device, Path(marked_folder), key_source)
    stop, early = (None, None) if alpha is None or all_draws else sequential_design(alpha, len(candidates))
    # a round fills about one forward batch, and holds no more candidates than the fewest that can stop it
    per_round = max(1, min(batch_size // len(published.files), stop or len(candidates), early or len(candidates)))

    def losses_of(chosen: list[Candidate]) -> np.ndarray:
        return candidate_mean_losses(chosen, images, hashes, cfg, pool, device, predict, label, batch_size, label_name)

    first = losses_of([published, *candidates[:per_round]])
    observed, null = first[0], first[1:]
    while (decided := sequential_p_value(null <= observed, len(candidates), stop, early)) is None:  # ties count against
        end = len(null) + per_round
        if early is not None and len(null) < early:  # a round ends at the early look, not past it
            end = min(end, early)
        null = np.concatenate([null, losses_of(candidates[len(null) : end])])
    p_value, used = decided
    at_least_as_low = int(np.sum(null[:used] <= observed))
    return {
        "design": key["design"],
        "p_value": p_value,
        "smallest_possible_p_value": floor,
        "n_images": len(published.files),
        "n_originals": len(images),
        "n_candidates": len(candidates),
        "n_scored": used,
        "stopped": stop is not None and at_least_as_low >= stop,  # p = stop / n_scored (+ 1 / (early + 1))
        "stop_after": stop,  # candidates scoring at least as low that end the audit (None: all scored)
        "decided_early": early is not None and used == early and at_least_as_low == 0,  # p = 1 / (early + 1)
        "early_look": early,  # candidates after which an unbeaten published mean loss ends the audit
        "access": str(predict.access),
        "queries": predict.queries,
        "draws_seed": draws_seed if key["design"] == "subset" else None,
        "published_loss": float(observed),
        "candidates_loss": {"min": float(null[:used].min()), "median": float(np.median(null[:used]))},
    }


def read_originals(key: dict[str, Any], folder: Path) -> tuple[list[np.ndarray], list[str]]:
    """The owner's originals the key lists (on the key's grid) and their hashes, each checked to be
    the file the key was made from."""
    images, hashes = [], []
    for entry in key["files"]:
        path = folder / entry["original"]
        if not path.is_file() or file_sha256(path) != entry["original_sha256"]:
            raise StageError(f"{path}: missing or not the original the key was made from (pass --originals)")
        image = fit_to_grid(read_rgb(path), key["max_resolution"])
        if image.shape[:2] != (entry["height"], entry["width"]):
            raise StageError(
                f"{path}: {image.shape[0]}x{image.shape[1]} pixels on the grid, but the key says "
                f"{entry['height']}x{entry['width']} (its max_resolution was changed?)"
            )
        images.append(image)
        hashes.append(entry["original_sha256"])
    return images, hashes


def marked_candidate(
    candidate: Candidate,
    images: list[np.ndarray],
    hashes: list[str],
    cfg: MarkConfig,
    pool: Any,
    device: str | None,
    channels_first: bool = False,
) -> list[np.ndarray]:
    """A candidate's images (of the owner's originals) marked with its pattern, (H, W, 3) each, or
    (3, H, W) as the model takes them with `channels_first`."""
    own = candidate.files
    return mark_images(
        [images[i] for i in own],
        [hashes[i] for i in own],
        candidate.pattern_seed,
        cfg,
        pool,
        device,
        channels_first=channels_first,
    )


MARK_FIELDS = "seed, design fields, mark.*, max_resolution"  # what decides the published pixels


def check_key_makes_published(
    key: dict[str, Any],
    published: Candidate,
    images: list[np.ndarray],
    hashes: list[str],
    cfg: MarkConfig,
    pool: Any,
    device: str | None,
    marked_folder: Path,
    key_source: str,
) -> None:
    """Refuse a key whose settings do not make the published copies from the originals: an edited
    field (mark.alpha 0.7 -> 0.5, say) would otherwise score marks that were never published."""
    for i, image in zip(published.files, marked_candidate(published, images, hashes, cfg, pool, device)):
        copy = marked_folder / key["files"][i]["marked"]
        if not np.array_equal(read_rgb(copy), image):
            raise StageError(
                f"{key_source}: its settings do not make {copy} from {key['files'][i]['original']}: a field "
                f"that decides the marks ({MARK_FIELDS}) was edited; audit with the key mtrack owner mark wrote"
            )


def candidate_mean_losses(
    candidates: list[Candidate],
    images: list[np.ndarray],
    hashes: list[str],
    cfg: MarkConfig,
    pool: Any,
    device: str | None,
    predict: Predict,
    label: int,
    batch_size: int,
    label_name: str = "label",
) -> np.ndarray:
    """Each candidate's mean loss over its images marked with its pattern. Images of several
    candidates share a forward pass (full batches matter on a busy CPU), and only about a batch per
    image size is held at a time, whatever the number of candidates."""
    totals, counts = np.zeros(len(candidates)), np.zeros(len(candidates))
    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}

    def score(shape: tuple[int, ...]) -> None:
        owners, batch = zip(*pending.pop(shape))
        np.add.at(totals, list(owners), per_image_losses(predict, np.stack(batch), label, batch_size, label_name))
        np.add.at(counts, list(owners), 1)

    def mark(candidate: Candidate) -> list[np.ndarray]:
        return marked_candidate(candidate, images, hashes, cfg, pool, device, channels_first=True)

    for index, marked in enumerate(in_parallel(mark, candidates, 1 if device else marking_threads())):
        for image in marked:
            pending.setdefault(image.shape, []).append((index, image))
            if len(pending[image.shape]) >= batch_size:
                score(image.shape)
    for shape in list(pending):
        score(shape)
    return totals / counts


def marking_threads() -> int:
    """Threads that mark candidates at once on the CPU: the cores this process may use (the marking
    kernels release the GIL); all cores where the system cannot say (macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_parallel(fn: Callable[[Any], Any], items: list[Any], threads: int) -> Iterator[Any]:
    """fn(item) for each item, in order, computed by `threads` threads at most 2 x threads items
    ahead of the consumer (so memory holds a few candidates' images, not all)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as executor:
        ahead: deque[Any] = deque()
        for item in items:
            ahead.append(executor.submit(fn, item))
            if len(ahead) > 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


@torch.no_grad()
def per_image_losses(
    predict: Predictor, images: np.ndarray, label: int, batch_size: int, label_name: str = "label"
) -> np.ndarray:
    """Each (3, H, W) uint8 image's loss-like score for `label` at the predictor's access level
    (fp32 cross-entropy from the logit margin for logits; see `owner.access`)."""
    access, out = predict.access, []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size])
        outs = [predict(view(batch)) for view in access.views]
        if (classes := access.classes(outs[0])) is not None and not 0 <= label < classes:
            raise StageError(f"{label_name} {label}: outside the model's {classes} classes (0 to {classes - 1})")
        out.append(access.scores(outs, label))
    return np.concatenate(out)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@validate_call
def load_predictor(
    spec: str | Path, arch: str | None = None, num_classes: ClassCount | None = None, access: str = "logits"
) -> Predictor:
    """`spec` is a checkpoint file (this pipeline's model.pt, or a plain state_dict given --arch and
    --num-classes, normalised with ImageNet statistics), loaded as weights only, of which the audit
    sees only what `access` allows (an API at that level, simulated); or `module:function`, a
    black-box callable taking uint8 NCHW images and returning what `access` says (logits by
    default), imported as `python -m` would: from the current directory first, then PYTHONPATH and
    the installed packages."""
    level = Access.parse(access)
    path = Path(spec)
    if not path.exists() and ":" in str(spec):
        return Predictor(_import_callable(str(spec)), f"--model {spec}", level)
    predictor = _load_network(path, arch, num_classes)
    return Predictor(predictor, f"--model {path}", level, restrict=level.level != "logits")


def _load_network(path: Path, arch: str | None, num_classes: int | None) -> torch.nn.Module:
    if arch is not None and arch not in MODELS.names():
        raise StageError(f"--arch {arch}: unknown architecture (known: {', '.join(MODELS.names())})")
    blob = read_checkpoint(path)
    if isinstance(blob, dict) and "meta" in blob:
        model, meta = load_weights(path)
        given = {"--arch": (arch, meta["arch"]), "--num-classes": (num_classes, meta["num_classes"])}
        for flag, (value, saved) in given.items():
            if value is not None and value != saved:  # the file says what it is: a different wish is a mistake
                raise StageError(f"{flag} {value}: {path} is this pipeline's model of {flag} {saved}; leave {flag} out")
        return model
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StageError(f"{path}: holds a {type(state).__name__} that is not a state_dict (names to tensors)")
    if arch is None or num_classes is None:
        raise StageError(f"{path}: a plain state_dict; pass --arch and --num-classes")
    model = Normalized(build_model(arch, num_classes), IMAGENET_MEAN, IMAGENET_STD)
    try:
        load_fitting(model.net, state)
    except (RuntimeError, AttributeError, TypeError, StageError) as exc:
        raise StageError(f"{path}: does not fit --arch {arch} --num-classes {num_classes}: {first_line(exc)}") from None
    return model.eval()


def _raised(exc: BaseException) -> str:
    """What the user's code raised, in a few words; sys.exit(3) is named as such, since the tool,
    not the callable, decides how the command ends (one error line, exit status 2)."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {first_line(exc)}"


def _import_callable(spec: str) -> Predict:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise StageError(f"--model {spec}: expected a checkpoint file or module:function")
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (Exception, SystemExit) as exc:  # importing runs the user's module: whatever fails there is reported
        raise StageError(f"--model {spec}: cannot import the callable ({_raised(exc)})") from None
    finally:
        if added:
            sys.path.remove(here)
    if not callable(fn):
        raise StageError(f"--model {spec}: not callable (it is of type {type(fn).__name__})")
    return fn
