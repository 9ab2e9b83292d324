"""`mtrack run CONFIG --rehearse`: a GPU recipe rehearsed at reduced scale before GPU-hours are spent.

Everything that decides the cost of the data path stays as the recipe has it: the image folder and
its storage (data.max_resolution, JPEG share and quality), the crop sizes and progressive resizing,
the shard counts and SLURM job arrays, W&B. What changes:
- **sizes follow the folder**: K = 25 images per user; M non-member users so that the audit set
  is a tenth of the folder (M x K = 5,000 x 25 is ~10% of ImageNet-1k); enough held-out images for
  them (1.2 M K: ImageNet's 150,000 held out of 1,281,167 at that M); member users scaled from the
  recipe's by the training set's size (at least 2);
- **the network** is a small CNN (4, 8 and 16 channels) trained for 2 epochs on the CPU (one
  process, batches of 64, the learning rate scaled with the batch), the crops growing from the
  recipe's smallest to its largest over those two epochs; its convolutions cost little beside
  decoding, so the train and audit stages measure the data path;
- **resources** are cut to what the partition's nodes (or, running locally, this machine) offer:
  no GPUs, CPUs and memory at most a node's.
Every stage still runs for real, so the run checks the whole path on the cluster and its manifests
measure the rates (`usage`: seconds, CPU-seconds, peak memory, bytes) that the cost estimate needs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, RunConfig, load_config
from .data.sources import load_source

USER_IMAGES = 25  # K at the target scale (M = 5,000 x K = 25 on ImageNet-1k)
AUDIT_SHARE = 0.10  # M x K as a share of the data, as at that scale
HELD_OUT_SLACK = 1.2  # held-out images per non-member image: classes draw unevenly from a random split
MIN_MEMBERS, MIN_NONMEMBERS = 2, 4
EPOCHS, BATCH, ARCH, WIDTH = 2, 64, "small_cnn", 4  # 4-8-16 channels: the data path, not convolutions, dominates


def node_limits(cfg: RunConfig, launcher: str) -> tuple[int, float]:
    """CPUs and GB of memory one job may ask for: a node of the partition, or this machine."""
    if launcher == "slurm":
        from .launchers.preflight import read_partition

        nodes = read_partition(cfg.launch.slurm.partition).nodes
        if nodes:
            return max(n.cpus for n in nodes), max(n.mem_mb for n in nodes) / 1024 * 0.9
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return os.cpu_count() or 1, memory * 0.9


def rehearsal_sizes(n_images: int, recipe: RunConfig) -> dict[str, int]:
    """Plan sizes for a folder of `n_images` training-split images (see the module docstring)."""
    nonmembers = max(MIN_NONMEMBERS, round(AUDIT_SHARE * n_images / USER_IMAGES))
    held_out = math.ceil(HELD_OUT_SLACK * nonmembers * USER_IMAGES)
    n_train = n_images - held_out
    members = max(MIN_MEMBERS, round(recipe.plan.n_member_users * n_train / recipe.data.n_train))
    if n_train < 2 * members * USER_IMAGES:
        needed = held_out + 2 * members * USER_IMAGES
        raise ConfigError(
            f"data.root: {n_images} training images are too few for a rehearsal (K = {USER_IMAGES}: at least {needed})"
        )
    return {
        "data.n_train": n_train,
        "plan.n_member_users": members,
        "plan.n_nonmember_users": nonmembers,
        "plan.samples_per_user": USER_IMAGES,
    }


@dataclass(frozen=True)
class Rehearsal:
    """The config values that turn a recipe into its rehearsal on a folder of `n_images` images."""

    n_images: int
    settings: dict[str, object]

    def overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.settings.items()]

    def summary(self, cfg: RunConfig) -> str:
        """What the rehearsal runs, from its final config (the user's overrides applied)."""
        p, t = cfg.plan, cfg.train
        return (
            f"rehearsal on {self.n_images:,} images: {cfg.data.n_train:,} trained on, {p.n_member_users} member "
            f"and {p.n_nonmember_users} non-member users of K = {p.samples_per_user}, {t.arch} for {t.epochs} "
            f"epochs on the CPU, in {cfg.run_dir}"
        )


def plan_rehearsal(config_path: str | Path, overrides: list[str], launcher: str) -> Rehearsal:
    """The rehearsal of a recipe (with the user's overrides, which are applied again after the
    rehearsal's own values, so they still win)."""
    recipe = load_config(config_path, overrides)
    n_images = len(load_source(recipe.data).train_images)
    sizes = rehearsal_sizes(n_images, recipe)
    cpus, mem_gb = node_limits(recipe, launcher)
    t = recipe.train
    per_step = t.batch_size * (t.devices if isinstance(t.devices, int) else 1) * t.num_nodes
    train = {
        "arch": ARCH,
        "width": WIDTH,
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "eval_batch_size": 128,
        "lr": round(t.lr * BATCH / per_step, 6),
        "warmup_epochs": 0,
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "num_workers": min(t.num_workers, cpus),
        "checkpoint_every_n_steps": 100,
    }
    if t.min_resolution is not None:
        train["resize_epochs"] = [0, EPOCHS - 1]
    settings: dict[str, object] = {
        **sizes,
        **{f"train.{k}": v for k, v in train.items()},
        "audit.batch_size": 128,
        "audit.num_workers": min(recipe.audit.num_workers, cpus),
        "write.num_workers": min(recipe.write.num_workers, cpus),
        "run_dir": f"{recipe.run_dir}-rehearsal-{n_images}",
        "results_dir": f"{recipe.run_dir}-rehearsal-{n_images}/results",
    }
    slurm = recipe.launch.slurm
    for name, res in [("default", slurm.default), *((f"stages.{s}", r) for s, r in slurm.stages.items())]:
        settings[f"launch.slurm.{name}.cpus_per_task"] = min(res.cpus_per_task, cpus)
        settings[f"launch.slurm.{name}.mem_gb"] = round(min(res.mem_gb, mem_gb), 1)
        settings[f"launch.slurm.{name}.gpus_per_node"] = 0
    return Rehearsal(n_images, settings)
