"""Stage `plan`: who the users are.

Draws the training subset, then member users (K training images of one class each) and
non-member users (K images of one class each from the part of the train split that is never
trained on). No image belongs to two users. The manifest rows (user id, role, class, split,
sample ids, pattern seed) define the users for every later stage; nothing depends on file order.
With `plan.owners`, member users are data owners instead: each holds P held-out images of a class,
and the K their own tool publishes replace K training images of that class (`owners` in the
manifest; more owners are never trained on).
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import numpy as np

from ..config import DataConfig, RunConfig
from ..core.seeds import child_seed
from ..data.sources import ImageSplits, load_source
from ..owner.designs import DesignParams, published_candidate
from ..store import StageError, save_npz, write_json
from .contract import Context

MEMBER, NONMEMBER = "member", "nonmember"


def _assign_classes(n_users: int, n_classes: int, rng: np.random.Generator, only: tuple[int, ...] = ()) -> np.ndarray:
    """Spread users over classes (or over `only`, in that order) as evenly as possible, in a seeded
    random order."""
    if only:
        return np.resize(np.array(only), n_users)
    classes = np.concatenate([rng.permutation(n_classes) for _ in range(-(-n_users // n_classes))])
    return classes[:n_users]


def _draw_users(
    role: str,
    first_id: int,
    n_users: int,
    pool: np.ndarray,
    labels: np.ndarray,
    k: int,
    n_classes: int,
    rng: np.random.Generator,
    seed: int,
    only: tuple[int, ...] = (),
    k_key: str = "plan.samples_per_user",
) -> list[dict[str, Any]]:
    """`n_users` users of `k` images of one class each from `pool`; `k_key` is the setting that asked
    for `k`, named when a class has too few."""
    users = []
    available = {c: list(rng.permutation(pool[labels[pool] == c])) for c in range(n_classes)}
    for offset, cls in enumerate(_assign_classes(n_users, n_classes, rng, only)):
        cls = int(cls)
        if len(available[cls]) < k:
            raise StageError(
                f"plan: class {cls} has only {len(available[cls])} unused {role} images left, "
                f"need {k_key}={k}; lower {k_key} or the number of {role} users"
            )
        ids = sorted(int(i) for i in available[cls][:k])
        del available[cls][:k]
        uid = first_id + offset
        users.append(
            {
                "user_id": uid,
                "role": role,
                "class": cls,
                "split": "train",
                "sample_ids": ids,
                "pattern_seed": child_seed(seed, 1, uid),
            }
        )
    return users


def make_plan(cfg: RunConfig, data: ImageSplits) -> tuple[dict[str, Any], np.ndarray]:
    """Return (manifest body, training subset ids). Pure function of the config and the data."""
    rng = np.random.default_rng(child_seed(cfg.seed, 0))
    n_total = len(data.train_labels)
    if data.num_classes < 2:  # one class: every loss is 0 and the audit's logit margin is infinite
        raise StageError(f"plan: {data.name} has {data.num_classes} class; the audited classifier needs at least 2")
    if cfg.data.n_train >= n_total:
        raise StageError(
            f"plan: data.n_train={cfg.data.n_train} leaves no held-out images in the {n_total}-image train split "
            "for non-member users"
        )
    order = rng.permutation(n_total)
    train_ids, heldout_ids = np.sort(order[: cfg.data.n_train]), np.sort(order[cfg.data.n_train :])
    k, labels, n_classes = cfg.plan.samples_per_user, data.train_labels, data.num_classes
    if any(not 0 <= c < n_classes for c in cfg.plan.member_classes):
        raise StageError(
            f"plan.member_classes {list(cfg.plan.member_classes)}: {data.name} has classes 0..{n_classes - 1}"
        )
    owners: list[dict[str, Any]] = []
    if cfg.plan.owners is None:
        members = _draw_users(
            MEMBER, 0, cfg.plan.n_member_users, train_ids, labels, k, n_classes, rng, cfg.seed, cfg.plan.member_classes
        )
    else:
        owners = _draw_owners(cfg, 0, cfg.plan.n_member_users, heldout_ids, labels, n_classes, rng, trained=True)
        members, train_ids = _owners_as_members(owners, train_ids, labels, rng)
        heldout_ids = np.setdiff1d(heldout_ids, [i for o in owners for i in o["pool"]])
    nonmembers = _draw_users(
        NONMEMBER, len(members), cfg.plan.n_nonmember_users, heldout_ids, labels, k, n_classes, rng, cfg.seed
    )
    if cfg.plan.owners is not None:
        unused = np.setdiff1d(heldout_ids, [i for u in nonmembers for i in u["sample_ids"]])
        owners += _draw_owners(
            cfg, len(owners), cfg.plan.owners.never_trained, unused, labels, n_classes, rng, trained=False
        )
    body = {
        "dataset": data.name,
        "classes": list(data.classes),
        "n_train": int(cfg.data.n_train),
        "n_test": int(len(data.test_labels)),
        "samples_per_user": k,
        # what bounds M: non-member users take K held-out images of one class each
        "heldout_per_class": np.bincount(labels[heldout_ids], minlength=n_classes).tolist(),
        "users": members + nonmembers,
        **({"owners": owners, "owner_design": asdict(owner_params(cfg))} if owners else {}),
    }
    return body, train_ids


def owner_params(cfg: RunConfig) -> DesignParams:
    """The `mtrack owner mark` options every owner of the run uses."""
    o = cfg.plan.owners
    assert o is not None
    return DesignParams(o.design, None if o.design == "pattern" else cfg.plan.samples_per_user, o.draws, o.n_patterns)


def _draw_owners(
    cfg: RunConfig,
    first_id: int,
    n_owners: int,
    pool: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    rng: np.random.Generator,
    trained: bool,
) -> list[dict[str, Any]]:
    """Owners holding `plan.owners.images` held-out images of one class each (trained ones: of the
    member classes). Which images an owner publishes is their tool's choice from their seed, made
    here by the same function `mtrack owner mark` calls; the mark stage checks that the tool
    agrees."""
    assert cfg.plan.owners is not None
    drawn = _draw_users(
        "owner",
        first_id,
        n_owners,
        pool,
        labels,
        cfg.plan.owners.images,
        n_classes,
        rng,
        cfg.seed,
        cfg.plan.member_classes if trained else (),
        "plan.owners.images",
    )
    owners = []
    for user in drawn:
        seed = child_seed(cfg.seed, 5, user["user_id"])
        published, _ = published_candidate(owner_params(cfg), seed, len(user["sample_ids"]))
        owners.append(
            {
                "owner_id": user["user_id"],
                "trained": trained,
                "class": user["class"],
                "seed": seed,
                "pool": user["sample_ids"],
                "published": [user["sample_ids"][i] for i in published.files],
            }
        )
    return owners


def _owners_as_members(
    owners: list[dict[str, Any]], train_ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Member users made of the owners' published images, which replace as many random training
    images of the same class (the training set keeps its size and class balance)."""
    members, dropped = [], []
    for owner in owners:
        same_class = np.setdiff1d(train_ids[labels[train_ids] == owner["class"]], dropped)
        dropped += rng.choice(same_class, len(owner["published"]), replace=False).tolist()
        members.append(
            {
                "user_id": owner["owner_id"],
                "role": MEMBER,
                "class": owner["class"],
                "split": "train",
                "sample_ids": owner["published"],
                "owner": owner["owner_id"],
            }
        )
    published = [i for o in owners for i in o["published"]]
    return members, np.sort(np.concatenate([np.setdiff1d(train_ids, dropped), published])).astype(train_ids.dtype)


@functools.lru_cache(maxsize=1)
def _source(cfg: DataConfig) -> ImageSplits:
    """The data source, loaded once per process for the check and the stage that follows it."""
    return load_source(cfg)


def check_plan(cfg: RunConfig) -> None:
    """Everything the plan stage would refuse (classes, owners' and users' counts against the data),
    found by drawing the plan and discarding it: the checks cannot drift from the stage's."""
    make_plan(cfg, _source(cfg.data))


def run_plan(ctx: Context) -> None:
    body, train_ids = make_plan(ctx.config, _source(ctx.config.data))
    save_npz(ctx.stage.path("train_ids.npz"), train_ids=train_ids)
    write_json(ctx.stage.path("users.json"), body)
    ctx.stage.finish(["users.json", "train_ids.npz"])
