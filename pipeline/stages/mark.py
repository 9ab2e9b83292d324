"""Stage `mark`: apply every user's mark to their images, optionally in shards.

Owners (`plan.owners`) are not marked here but by their own tool: their originals are written as a
folder under `owners/<id>/` and marked by the code `mtrack mark` runs, with the owner's seed; the
published images of trained-on owners become their member users' marked images.

Members and non-members are marked the same way, each with their own pattern; noise is seeded per
(user, sample), so marks are bit-identical for a seed whatever the sharding. Shard i of n marks
users i, i+n, ... and writes only its own shard file (images, ids, PSNR and SSIM per image), so an
array job can split the users; a finished shard is skipped. Finishing the stage checks that every
shard is there, then writes per-user quality, a grid of originals next to marked versions, and the
mark's survival under JPEG re-encoding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..config import MarkConfig, RunConfig  # noqa: E402
from ..core.marking import OODPool, make_pattern, mark_batch, resolve_device  # noqa: E402
from ..core.quality import psnr, ssim  # noqa: E402
from ..core.seeds import child_seed  # noqa: E402
from ..data.images import read_rgb, write_png  # noqa: E402
from ..data.ood import ood_pool  # noqa: E402
from ..data.sources import ImageSplits  # noqa: E402
from ..owner.key import KEY_NAME  # noqa: E402
from ..owner.marking import mark_folder  # noqa: E402
from ..store import Stage, StageError, atomic_path, load_npz, read_json, run_shards, save_npz, write_json  # noqa: E402
from .plan import owner_params  # noqa: E402
from ..core.survival import mark_survival  # noqa: E402

SHARD_ARRAYS = ("images", "user_ids", "sample_ids", "labels", "psnr", "ssim")


def noise_seeds(user: dict[str, Any]) -> np.ndarray:
    return np.array([child_seed(user["pattern_seed"], 2, sid) for sid in user["sample_ids"]], dtype=np.uint64)


def mark_user(user: dict[str, Any], images: np.ndarray, cfg: MarkConfig, pool: OODPool | None = None,
              device: str | None = None) -> np.ndarray:
    """Marked copies of one user's images, given in the order of `user['sample_ids']`."""
    _, h, w, _ = images.shape
    pattern = make_pattern(cfg, user["pattern_seed"], h, w, pool)
    return mark_batch(images, pattern, noise_seeds(user), cfg, device)


def owner_folder(stage_dir: Path, owner_id: int) -> Path:
    return stage_dir / "owners" / f"{owner_id:05d}"


def run_owner_tool(cfg: RunConfig, data: ImageSplits, owner: dict[str, Any], folder: Path) -> list[np.ndarray]:
    """The folder a real owner would have: their originals as PNG files (`originals/`), marked by the
    owner's own tool (the code `mtrack mark` runs, with the owner's seed) into `published/`. Returns
    the published images in sample order, after checking they are the ones the plan put in training."""
    originals = folder / "originals"
    originals.mkdir(parents=True, exist_ok=True)
    for sid in owner["pool"]:
        write_png(originals / f"{sid:08d}.png", data.train_images[sid])
    key = mark_folder(originals, folder / "published", cfg.mark, seed=owner["seed"], force=True, label=owner["class"],
                      params=owner_params(cfg))
    entries = [key["files"][i] for i in key["published"]]
    if [int(Path(e["original"]).stem) for e in entries] != owner["published"]:
        raise StageError(f"{folder}: the owner's tool published other images than the plan has in training")
    return [read_rgb(folder / "published" / e["marked"]) for e in entries]


def mark_shard(cfg: RunConfig, data: ImageSplits, users: list[dict[str, Any]], owners: list[dict[str, Any]],
               stage_dir: Path, path: Path) -> None:
    """Mark the given users' images (owners' through their own tool) and save them with their ids,
    PSNR and SSIM; mark the folders of the given never-trained-on owners."""
    pool, device = ood_pool(cfg.mark, cfg.data.image_size), resolve_device(cfg.mark.device)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SHARD_ARRAYS}
    by_owner = {o["owner_id"]: o for o in owners}
    for owner in owners:
        if not owner["trained"]:
            run_owner_tool(cfg, data, owner, owner_folder(stage_dir, owner["owner_id"]))
    for user in users:
        originals = data.train_images[user["sample_ids"]]
        if "owner" in user:
            marked = np.stack(run_owner_tool(cfg, data, by_owner[user["owner"]], owner_folder(stage_dir, user["owner"])))
        else:
            marked = mark_user(user, originals, cfg.mark, pool, device)
        k = len(marked)
        for key, value in (("images", marked), ("user_ids", np.full(k, user["user_id"])),
                           ("sample_ids", np.array(user["sample_ids"])), ("labels", np.full(k, user["class"])),
                           ("psnr", psnr(originals, marked)), ("ssim", ssim(originals, marked))):
            parts[key].append(value)
    h, w = data.train_images.shape[1:3]
    empty = {"images": np.zeros((0, h, w, 3), np.uint8)}
    save_npz(path, **{k: np.concatenate(v) if v else empty.get(k, np.zeros(0)) for k, v in parts.items()})


def load_marked(mark_dir: Path, users: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """All shards of a finished mark stage, rows in manifest order (user, then sample)."""
    return merge_shards(mark_dir, read_json(mark_dir / "manifest.json")["shards"], users)


def merge_shards(mark_dir: Path, names: list[str], users: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate shard files and order rows by manifest position: the result does not depend on
    how many shards there were."""
    missing = [n for n in names if not (mark_dir / n).exists()]
    if missing:
        raise StageError(f"{mark_dir}: shards {', '.join(missing)} are not done yet")
    shards = [load_npz(mark_dir / name) for name in names]
    merged = {k: np.concatenate([s[k] for s in shards]) for k in SHARD_ARRAYS}
    position = {u["user_id"]: i for i, u in enumerate(users)}
    order = np.lexsort((merged["sample_ids"], [position[int(u)] for u in merged["user_ids"]]))
    expected = sum(len(u["sample_ids"]) for u in users)
    if len(order) != expected:
        raise StageError(f"{mark_dir}: shards hold {len(order)} marked images, the plan has {expected}")
    return {k: v[order] for k, v in merged.items()}


def save_examples(path: Path, originals: list[np.ndarray], marked: list[np.ndarray], titles: list[str]) -> None:
    """A grid with one user per row pair: originals on top, their marked versions below."""
    n_cols = min(8, min(len(o) for o in originals))
    fig, axes = plt.subplots(2 * len(originals), n_cols, figsize=(1.3 * n_cols, 2.7 * len(originals)), squeeze=False)
    for row, (orig, mk, title) in enumerate(zip(originals, marked, titles)):
        for col in range(n_cols):
            for r, img, label in ((2 * row, orig[col], "original"), (2 * row + 1, mk[col], "marked")):
                ax = axes[r, col]
                ax.imshow(img, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(f"{title}\n{label}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def quality_by_user(marked: dict[str, np.ndarray], users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for user in users:
        sel = marked["user_ids"] == user["user_id"]
        rows.append({"user_id": user["user_id"], "role": user["role"],
                     "psnr_mean": float(marked["psnr"][sel].mean()), "psnr_min": float(marked["psnr"][sel].min()),
                     "ssim_mean": float(marked["ssim"][sel].mean()), "ssim_min": float(marked["ssim"][sel].min())})
    return rows


def survival_of(cfg: RunConfig, data: ImageSplits, users: list[dict[str, Any]], marked: dict[str, np.ndarray],
                pool: OODPool | None, max_users: int = 50) -> dict[str, Any]:
    """How much of the mark survives JPEG re-encoding, measured on the first `max_users` users."""
    originals, stored, patterns, seeds = [], [], [], []
    h, w = data.train_images.shape[1:3]
    for user in users[:max_users]:
        originals.append(data.train_images[user["sample_ids"]])
        stored.append(marked["images"][marked["user_ids"] == user["user_id"]])
        patterns.append(np.broadcast_to(make_pattern(cfg.mark, user["pattern_seed"], h, w, pool),
                                        (len(user["sample_ids"]), h, w, 3)))
        seeds.append(noise_seeds(user))
    storage = mark_survival(np.concatenate(originals), np.concatenate(stored), cfg.mark, np.concatenate(patterns),
                            np.concatenate(seeds))
    n_images = storage.pop("n_images")
    return {"n_images": n_images, "storage": storage}


def run_mark(cfg: RunConfig, stage: Stage, data: ImageSplits, users: list[dict[str, Any]],
             num_shards: int = 1, only_shard: int | None = None, owners: Sequence[dict[str, Any]] = ()) -> None:
    """Mark the missing shards (or only `only_shard`); once all are there, finish the stage."""
    shard_owners = [o for o in owners if not o["trained"]]  # trained owners are marked with their member user
    trained_owners = [o for o in owners if o["trained"]]
    names = run_shards(stage, num_shards, None if only_shard is None else [only_shard],
                       lambda shard, path: mark_shard(cfg, data, users[shard::num_shards],
                                                      trained_owners + shard_owners[shard::num_shards], stage.dir, path))
    if names is None:
        return  # other array tasks still own the rest; the stage finishes when all are there
    marked = merge_shards(stage.dir, names, users)
    quality = quality_by_user(marked, users)
    members = [u for u in users if u["role"] == "member"][: cfg.mark.examples_users // 2]
    others = [u for u in users if u["role"] != "member"][: cfg.mark.examples_users - len(members)]
    shown = members + others
    originals = [data.train_images[u["sample_ids"]] for u in shown]
    save_examples(stage.path("marked_examples.png"), originals,
                  [marked["images"][marked["user_ids"] == u["user_id"]] for u in shown],
                  [f"user {u['user_id']} ({u['role']}, {data.classes[u['class']]})" for u in shown])
    survival = survival_of(cfg, data, [u for u in users if "owner" not in u], marked,  # owners' marks: their keys
                           pool=ood_pool(cfg.mark, cfg.data.image_size))
    write_json(stage.path("quality.json"), {"per_user": quality})
    write_json(stage.path("survival.json"), survival)
    summary = {role: {"psnr_mean": float(np.mean([q["psnr_mean"] for q in quality if q["role"] == role])),
                      "ssim_mean": float(np.mean([q["ssim_mean"] for q in quality if q["role"] == role]))}
               for role in ("member", "nonmember")}
    stage.finish(names + ["quality.json", "survival.json", "marked_examples.png", *owner_outputs(stage.dir, owners)],
                 shards=names, quality=summary, per_user_quality=quality)


def owner_outputs(stage_dir: Path, owners: Sequence[dict[str, Any]]) -> list[str]:
    """Each owner's key and published images, relative to the stage folder."""
    out = []
    for owner in owners:
        published = owner_folder(stage_dir, owner["owner_id"]) / "published"
        key = read_json(published / KEY_NAME)
        out += [(published / name).relative_to(stage_dir).as_posix()
                for name in [KEY_NAME, *(key["files"][i]["marked"] for i in key["published"])]]
    return out
