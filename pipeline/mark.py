"""Stage `mark`: apply every user's mark to their images.

Members and non-members are marked the same way, each with their own pattern; noise is seeded per
(user, sample) so the marks are bit-identical for a seed. Writes the marked images with their user,
sample and label ids, per-user quality (PSNR), and a grid of originals next to marked versions.
"""
from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .config import RunConfig  # noqa: E402
from .marking import mark_batch, stripe_pattern  # noqa: E402
from .plan import child_seed  # noqa: E402
from .sources import ImageSplits  # noqa: E402
from .store import Stage, atomic_path, save_npz, write_json  # noqa: E402


def psnr(original: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for uint8 batches (B, H, W, C)."""
    mse = ((original.astype(np.float64) - marked.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


def mark_user(user: dict[str, Any], images: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """Marked copies of one user's images, given in the order of `user['sample_ids']`."""
    _, h, w, _ = images.shape
    pattern = stripe_pattern(user["pattern_seed"], h, w, cfg.mark.n_stripes)
    seeds = np.array([child_seed(user["pattern_seed"], 2, sid) for sid in user["sample_ids"]], dtype=np.uint64)
    return mark_batch(images, pattern, seeds, cfg.mark)


def save_examples(path: Any, originals: list[np.ndarray], marked: list[np.ndarray], titles: list[str]) -> None:
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


def run_mark(cfg: RunConfig, stage: Stage, data: ImageSplits, users: list[dict[str, Any]]) -> None:
    marked, user_ids, sample_ids, labels, per_user = [], [], [], [], []
    shown_orig, shown_marked, shown_titles = [], [], []
    for user in users:
        originals = data.train_images[user["sample_ids"]]
        out = mark_user(user, originals, cfg)
        marked.append(out)
        user_ids += [user["user_id"]] * len(out)
        sample_ids += user["sample_ids"]
        labels += [user["class"]] * len(out)
        quality = psnr(originals, out)
        per_user.append({"user_id": user["user_id"], "psnr_mean": float(quality.mean()), "psnr_min": float(quality.min())})
        if len(shown_orig) < cfg.mark.examples_users and (len(shown_orig) < cfg.mark.examples_users // 2 or user["role"] != "member"):
            shown_orig.append(originals), shown_marked.append(out)
            shown_titles.append(f"user {user['user_id']} ({user['role']}, {data.classes[user['class']]})")
    save_npz(
        stage.path("marked.npz"),
        images=np.concatenate(marked),
        user_ids=np.array(user_ids, dtype=np.int64),
        sample_ids=np.array(sample_ids, dtype=np.int64),
        labels=np.array(labels, dtype=np.int64),
    )
    write_json(stage.path("quality.json"), {"per_user": per_user})
    save_examples(stage.path("marked_examples.png"), shown_orig, shown_marked, shown_titles)
    stage.finish(["marked.npz", "quality.json", "marked_examples.png"])
