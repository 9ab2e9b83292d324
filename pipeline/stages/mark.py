"""Stage `mark`: apply every user's mark to their images, optionally in shards.

Owners (`plan.owners`) are not marked here but by their own tool: their originals are written as a
folder under `owners/<id>/` and marked by the code `mtrack owner mark` runs, with the owner's seed;
the published images of trained-on owners become their member users' marked images.

Members and non-members are marked the same way, each with their own pattern; noise is seeded per
(user, sample), so marks are bit-identical for a seed whatever the sharding. Each image is marked
on the pixels the write stage stores (`StoredImages`: the grid, or with `data.max_resolution` its
own size shrunk to that longer side), so a marked image has the size of the clean one it replaces;
images of one user may then differ in size, and each size is marked as one batch. Shard i of n marks
users i, i+n, ... and writes only its own shard: the marked pixels streamed user by user into a raw
`.pixels` file, and an `.npz` with each image's ids, place and size in it, PSNR and SSIM. So no
process ever holds more than one user's images, and readers (`MarkedImages`) read each image when
asked for it; an array job can split the users; a finished shard is skipped. Finishing the stage
checks that every shard is there, then writes per-user quality, a grid of originals next to marked
versions, and the mark's survival under JPEG re-encoding (user by user).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..config import MarkConfig, RunConfig  # noqa: E402
from ..console import track  # noqa: E402
from ..core.marking import OODPool, make_pattern, mark_batch, resolve_device, shape_groups  # noqa: E402
from ..core.quality import psnr, ssim  # noqa: E402
from ..core.seeds import child_seed  # noqa: E402
from ..core.survival import summarise_survival, survival_correlations  # noqa: E402
from ..data.images import read_rgb, write_png  # noqa: E402
from ..data.ood import ood_pool  # noqa: E402
from ..data.sources import ImageSplits, StoredImages, load_source  # noqa: E402
from ..owner.designs import DesignParams  # noqa: E402
from ..owner.key import KEY_NAME  # noqa: E402
from ..owner.marking import mark_folder  # noqa: E402
from ..store import StageError, atomic_path, load_npz, read_json, run_shards, save_npz, write_json  # noqa: E402
from .contract import Context  # noqa: E402

SHARD_ARRAYS = ("user_ids", "sample_ids", "labels", "psnr", "ssim")  # besides the images
SURVIVAL_USERS = 50  # the mark's survival is measured on the images of this many users


PIXELS = ".pixels"  # a shard's marked images, end to end, raw uint8 (H, W, 3) each


class ShardWriter:
    """Streams one shard's marked images into its pixel file (whole or not at all, as every output)
    and collects what the shard's npz says about each: offset and size in that file, ids, quality."""

    def __init__(self, pixels_file: Any) -> None:
        self.file, self.position = pixels_file, 0
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in (*SHARD_ARRAYS, "offsets", "heights", "widths")}

    def add(self, user: dict[str, Any], originals: Sequence[np.ndarray], marked: Sequence[np.ndarray]) -> None:
        k = len(marked)
        for image in marked:
            self.parts["offsets"].append(np.array([self.position]))
            self.parts["heights"].append(np.array([image.shape[0]]))
            self.parts["widths"].append(np.array([image.shape[1]]))
            self.file.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            self.position += image.size
        for key, value in (
            ("user_ids", np.full(k, user["user_id"])),
            ("sample_ids", np.array(user["sample_ids"])),
            ("labels", np.full(k, user["class"])),
            ("psnr", per_image(psnr, originals, marked)),
            ("ssim", per_image(ssim, originals, marked)),
        ):
            self.parts[key].append(value)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in self.parts.items()}


class MarkedImages:
    """Marked images of a finished mark stage, indexable by row: each read from its shard's pixel
    file when asked for, so a reader holds only the images it is using (the page cache does the
    rest). Pickles without its open files (FFCV's writer processes reopen them)."""

    def __init__(
        self,
        mark_dir: Path,
        names: list[str],
        shard: np.ndarray,
        offsets: np.ndarray,
        heights: np.ndarray,
        widths: np.ndarray,
    ) -> None:
        self.files = [mark_dir / Path(name).with_suffix(PIXELS).name for name in names]
        self.shard, self.offsets, self.heights, self.widths = shard, offsets, heights, widths
        self._open: dict[int, int] = {}  # shard -> file descriptor

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        shard, h, w = int(self.shard[i]), int(self.heights[i]), int(self.widths[i])
        if shard not in self._open:
            self._open[shard] = os.open(self.files[shard], os.O_RDONLY)
        data = os.pread(self._open[shard], h * w * 3, int(self.offsets[i]))
        if len(data) != h * w * 3:
            raise StageError(
                f"{self.files[shard]}: ends inside image {i} (truncated?); re-run the mark stage with --force"
            )
        return np.frombuffer(data, np.uint8).reshape(h, w, 3).copy()

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            os.close(fd)


def noise_seeds(user: dict[str, Any]) -> np.ndarray:
    return np.array([child_seed(user["pattern_seed"], 2, sid) for sid in user["sample_ids"]], dtype=np.uint64)


def mark_user(
    user: dict[str, Any],
    images: Sequence[np.ndarray],
    cfg: MarkConfig,
    pool: OODPool | None = None,
    device: str | None = None,
) -> list[np.ndarray]:
    """Marked copies of one user's images, given in the order of `user['sample_ids']`; each size is
    one batch, with the user's pattern drawn at that size."""
    seeds, marked = noise_seeds(user), list(images)
    for group in shape_groups(images):
        h, w = images[group[0]].shape[:2]
        batch = mark_batch(
            np.stack([images[i] for i in group]),
            make_pattern(cfg, user["pattern_seed"], h, w, pool),
            seeds[group],
            cfg,
            device,
        )
        for i, image in zip(group, batch):
            marked[i] = image
    return marked


def per_image(
    metric: Callable[[np.ndarray, np.ndarray], np.ndarray],
    originals: Sequence[np.ndarray],
    marked: Sequence[np.ndarray],
) -> np.ndarray:
    """A batch metric (`psnr`, `ssim`) image by image, for images of varying size."""
    return np.array([metric(o[None], m[None])[0] for o, m in zip(originals, marked)])


def owner_folder(stage_dir: Path, owner_id: int) -> Path:
    return stage_dir / "owners" / f"{owner_id:05d}"


def run_owner_tool(
    cfg: RunConfig, stored: StoredImages, owner: dict[str, Any], design: DesignParams, folder: Path
) -> list[np.ndarray]:
    """The folder a real owner would have: their originals as PNG files (`originals/`, on the grid
    the write stage stores them on, as `mtrack owner mark --max-resolution` would mark them), marked
    by the owner's own tool (the code `mtrack owner mark` runs, with the owner's seed) into
    `published/`. Returns the published images in sample order, after checking they are the ones the
    plan put in training."""
    originals = folder / "originals"
    originals.mkdir(parents=True, exist_ok=True)
    for sid, image in zip(owner["pool"], stored.take(owner["pool"])):
        write_png(originals / f"{sid:08d}.png", image)
    key = mark_folder(
        originals, folder / "published", cfg.mark, seed=owner["seed"], force=True, label=owner["class"], params=design
    )
    entries = [key["files"][i] for i in key["published"]]
    if [int(Path(e["original"]).stem) for e in entries] != owner["published"]:
        raise StageError(f"{folder}: the owner's tool published other images than the plan has in training")
    return [read_rgb(folder / "published" / e["marked"]) for e in entries]


def mark_shard(
    cfg: RunConfig,
    data: ImageSplits,
    users: list[dict[str, Any]],
    owners: list[dict[str, Any]],
    design: DesignParams | None,
    stage_dir: Path,
    path: Path,
    label: str = "mark",
) -> None:
    """Mark the given users' images (owners' through their own tool, with `design`) and save them with
    their ids, PSNR and SSIM; mark the folders of the given never-trained-on owners."""
    pool, device = ood_pool(cfg.mark, cfg.data.image_size), resolve_device(cfg.mark.device)
    stored = StoredImages(data.train_images, cfg.data.max_resolution)
    by_owner = {o["owner_id"]: o for o in owners}
    for owner in owners:
        if not owner["trained"]:
            assert design is not None
            run_owner_tool(cfg, stored, owner, design, owner_folder(stage_dir, owner["owner_id"]))
    with atomic_path(path.with_suffix(PIXELS)) as tmp, open(tmp, "wb") as pixels:
        shard = ShardWriter(pixels)
        for user in track(users, label, len(users), "users"):
            originals = stored.take(user["sample_ids"])
            if "owner" in user:
                assert design is not None
                marked = run_owner_tool(
                    cfg, stored, by_owner[user["owner"]], design, owner_folder(stage_dir, user["owner"])
                )
            else:
                marked = mark_user(user, originals, cfg.mark, pool, device)
            shard.add(user, originals, marked)
    save_npz(path, **shard.arrays())


def load_marked(manifest: Path, users: list[dict[str, Any]]) -> dict[str, Any]:
    """The marked images of a finished mark stage, read through its manifest (the stage's declared
    output: the shards it lists, beside it), rows in manifest order (user, then sample); "images"
    is a `MarkedImages` view (nothing is read before it is asked for)."""
    return merge_shards(manifest.parent, read_json(manifest)["shards"], users)


def merge_shards(mark_dir: Path, names: list[str], users: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' records ordered by manifest position, whatever the number of shards: ids,
    labels, quality per image (a few bytes each) and a `MarkedImages` view of the images."""
    missing = [n for n in names if not (mark_dir / n).exists() or not (mark_dir / n).with_suffix(PIXELS).exists()]
    if missing:
        raise StageError(f"{mark_dir}: shards {', '.join(missing)} are not done yet")
    shards = [load_npz(mark_dir / name) for name in names]
    merged = {k: np.concatenate([s[k] for s in shards]) for k in (*SHARD_ARRAYS, "offsets", "heights", "widths")}
    merged["shard"] = np.concatenate([np.full(len(s["user_ids"]), i) for i, s in enumerate(shards)])
    position = {u["user_id"]: i for i, u in enumerate(users)}
    order = np.lexsort((merged["sample_ids"], [position[int(u)] for u in merged["user_ids"]]))
    expected = sum(len(u["sample_ids"]) for u in users)
    if len(order) != expected:
        raise StageError(f"{mark_dir}: shards hold {len(order)} marked images, the plan has {expected}")
    rows = {k: v[order] for k, v in merged.items()}
    images = MarkedImages(mark_dir, names, *(rows.pop(k) for k in ("shard", "offsets", "heights", "widths")))
    return {**rows, "images": images}


def user_images(marked: dict[str, Any], users: list[dict[str, Any]]) -> dict[int, list[np.ndarray]]:
    """The marked images of the given users (user id -> images in the order of its sample ids)."""
    wanted = {u["user_id"] for u in users}
    rows = np.flatnonzero(np.isin(marked["user_ids"], list(wanted)))
    found = {(int(marked["user_ids"][i]), int(marked["sample_ids"][i])): marked["images"][i] for i in rows}
    return {u["user_id"]: [found[u["user_id"], sid] for sid in u["sample_ids"]] for u in users}


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
        rows.append(
            {
                "user_id": user["user_id"],
                "role": user["role"],
                "psnr_mean": float(marked["psnr"][sel].mean()),
                "psnr_min": float(marked["psnr"][sel].min()),
                "ssim_mean": float(marked["ssim"][sel].mean()),
                "ssim_min": float(marked["ssim"][sel].min()),
            }
        )
    return rows


def intended_marks(
    cfg: RunConfig, data: ImageSplits, users: list[dict[str, Any]], pool: OODPool | None
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """What `survival_correlations` recomputes the intended marks of these users' images from, user by user
    in the order of their sample ids: the originals as stored, each image's pattern at its size,
    the noise seeds."""
    stored = StoredImages(data.train_images, cfg.data.max_resolution)
    originals, patterns = [], []
    for user in users:
        images = stored.take(user["sample_ids"])
        by_size = {
            shape: make_pattern(cfg.mark, user["pattern_seed"], shape[0], shape[1], pool)
            for shape in {image.shape for image in images}
        }
        originals += images
        patterns += [by_size[image.shape] for image in images]
    return originals, patterns, np.concatenate([noise_seeds(u) for u in users] or [np.zeros(0, np.uint64)])


def survival_of(
    cfg: RunConfig, data: ImageSplits, users: list[dict[str, Any]], marked: dict[str, Any], pool: OODPool | None
) -> dict[str, Any]:
    """How much of the mark survives JPEG re-encoding, on the given users' marked images (one user
    at a time, so memory does not grow with their number)."""
    parts = []
    for user in users:
        originals, patterns, seeds = intended_marks(cfg, data, [user], pool)
        parts.append(
            survival_correlations(originals, user_images(marked, [user])[user["user_id"]], cfg.mark, patterns, seeds)
        )
    storage = summarise_survival(parts)
    n_images = storage.pop("n_images")
    return {"n_images": n_images, "storage": storage}


def run_mark(ctx: Context) -> None:
    """Mark the missing shards (or only the task's shard); once all are there, finish the stage."""
    cfg, stage, num_shards, only_shard = ctx.config, ctx.stage, ctx.task.num_shards, ctx.task.shard
    plan, data = read_json(ctx.input("users")), load_source(cfg.data)
    users, owners = plan["users"], plan.get("owners", [])
    design = DesignParams(**plan["owner_design"]) if owners else None
    shard_owners = [o for o in owners if not o["trained"]]  # trained owners are marked with their member user
    trained_owners = [o for o in owners if o["trained"]]
    names = run_shards(
        stage,
        num_shards,
        None if only_shard is None else [only_shard],
        lambda shard, path: mark_shard(
            cfg,
            data,
            users[shard::num_shards],
            trained_owners + shard_owners[shard::num_shards],
            design,
            stage.dir,
            path,
            f"mark shard {shard}" if num_shards > 1 else "mark",
        ),
    )
    if names is None:
        return  # other array tasks still own the rest; the stage finishes when all are there
    records = merge_shards(stage.dir, names, users)
    quality = quality_by_user(records, users)
    members = [u for u in users if u["role"] == "member"][: cfg.mark.examples_users // 2]
    others = [u for u in users if u["role"] != "member"][: cfg.mark.examples_users - len(members)]
    shown, measured = members + others, [u for u in users if "owner" not in u][:SURVIVAL_USERS]  # owners: their keys
    marked = user_images(records, shown)
    stored = StoredImages(data.train_images, cfg.data.max_resolution)
    save_examples(
        stage.path("marked_examples.png"),
        [stored.take(u["sample_ids"]) for u in shown],
        [marked[u["user_id"]] for u in shown],
        [f"user {u['user_id']} ({u['role']}, {data.classes[u['class']]})" for u in shown],
    )
    survival = survival_of(cfg, data, measured, records, pool=ood_pool(cfg.mark, cfg.data.image_size))
    write_json(stage.path("quality.json"), {"per_user": quality})
    write_json(stage.path("survival.json"), survival)
    summary = {
        role: {
            "psnr_mean": float(np.mean([q["psnr_mean"] for q in quality if q["role"] == role])),
            "ssim_mean": float(np.mean([q["ssim_mean"] for q in quality if q["role"] == role])),
        }
        for role in ("member", "nonmember")
    }
    pixels = [str(Path(name).with_suffix(PIXELS)) for name in names]
    stage.finish(
        names + pixels + ["quality.json", "survival.json", "marked_examples.png", *owner_outputs(stage.dir, owners)],
        shards=names,
        quality=summary,
        per_user_quality=quality,
    )


def owner_outputs(stage_dir: Path, owners: Sequence[dict[str, Any]]) -> list[str]:
    """Each owner's key and published images, relative to the stage folder."""
    out = []
    for owner in owners:
        published = owner_folder(stage_dir, owner["owner_id"]) / "published"
        key = read_json(published / KEY_NAME)
        out += [
            (published / name).relative_to(stage_dir).as_posix()
            for name in [KEY_NAME, *(key["files"][i]["marked"] for i in key["published"])]
        ]
    return out
