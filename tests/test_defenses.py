"""Countermeasures (`train.defense`): each transform does what it says, and a tiny model trained
with them (and one with DP-SGD) goes through the audit."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import mtrack
from pydantic import ValidationError
from torch import nn

from pipeline.config import DefenseConfig, DPConfig, RandAugmentConfig, TrainConfig
from pipeline.core.models import build_model, dp_compatible
from pipeline.store import read_json
from pipeline.training.countermeasures import COUNTERMEASURES, active
from pipeline.training.countermeasures.dp import dp_epsilon
from pipeline.training.countermeasures.jpeg import reencode_jpeg
from pipeline.training.countermeasures.outliers import select_inliers
from pipeline.training.countermeasures.pruning import magnitude_masks
from pipeline.training.countermeasures.randaugment import randaugment


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_jpeg_reencoding_is_lossy_and_deterministic() -> None:
    images = _images()
    low, again = reencode_jpeg(images, 30), reencode_jpeg(images, 30)
    assert low.dtype == torch.uint8 and low.shape == images.shape
    assert torch.equal(low, again), "re-encoding each batch must equal re-encoding the set once"
    error = lambda q: (reencode_jpeg(images, q).float() - images.float()).abs().mean()  # noqa: E731
    assert error(30) > error(95) > 0


def test_randaugment_per_batch_draws_one_transform_for_all_images() -> None:
    same = _images(1).repeat(16, 1, 1, 1)
    torch.manual_seed(0)
    per_batch = randaugment(same, RandAugmentConfig(per="batch"))
    assert all(torch.equal(per_batch[0], image) for image in per_batch)
    torch.manual_seed(0)
    per_image = randaugment(same, RandAugmentConfig(per="sample"))
    assert len({image.numpy().tobytes() for image in per_image}) > 4


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixing_turns_labels_into_class_probabilities(mix: str) -> None:
    (mixing,) = active(TrainConfig(defense=DefenseConfig(mix=mix)), num_classes=5)
    images, targets = mixing.transform(_images(), torch.arange(8) % 5)
    assert images.dtype == torch.float32 and targets.shape == (8, 5)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets.max(1).values < 1).all(), "every image is mixed with its neighbour's"


def test_transforms_run_in_trainer_order() -> None:
    every = DefenseConfig(jpeg_quality=80, randaugment=RandAugmentConfig(), mix="cutmix", early_stopping_patience=2)
    steps = [c for c in active(TrainConfig(defense=every), 5) if c.transforms_batches]
    assert [type(c).__name__ for c in steps] == ["JpegReencoding", "RandAugment", "Mixing"]
    assert active(TrainConfig(), 5) == []


def test_every_defense_key_belongs_to_one_plug_in() -> None:
    owned = [field for name in COUNTERMEASURES.names() for field in COUNTERMEASURES.lookup(name).fields]
    assert sorted(owned) == sorted(DefenseConfig.model_fields), "a train.defense key without a plug-in, or two"


def test_outlier_filter_drops_the_unusual_images_of_each_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = np.full((100, 3, 16, 16), 100, np.uint8) + rng.integers(0, 8, (100, 3, 16, 16), dtype=np.uint8)
    labels, users = np.arange(100) // 50, np.full(100, -1)
    images[[3, 7]] = 240  # two marked-looking images in class 0
    users[[3, 7]] = [0, 1]
    batches = [
        tuple(torch.from_numpy(a[i : i + 32]) for a in (images, labels, np.arange(100) + 1000, users))
        for i in range(0, 100, 32)
    ]
    kept, counts = select_inliers(batches, 0.04, tmp_path / "outliers.json")  # two per class
    record = read_json(tmp_path / "outliers.json")
    assert counts == {key: record[key] for key in ("dropped", "marked", "marked_dropped")}
    assert len(kept) == 96 and 3 not in kept and 7 not in kept
    assert record["dropped"] == 4 and record["marked"] == 2 and record["marked_dropped"] == 2
    assert {1003, 1007} <= set(record["dropped_sample_ids"])


def test_magnitude_pruning_uses_one_threshold_for_all_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20))
    with torch.no_grad():
        model[0].weight.mul_(1e-4)  # the small layer goes first
    masks = magnitude_masks(model, 0.5)
    assert not masks["0"].any() and masks["1"].all()
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == 400


def test_dp_epsilon_falls_with_more_noise() -> None:
    tight, loose = (
        dp_epsilon(DPConfig(noise_multiplier=2.0), 0.01, 1000),
        dp_epsilon(DPConfig(noise_multiplier=0.7), 0.01, 1000),
    )
    assert 0 < tight < loose < math.inf
    assert dp_epsilon(DPConfig(noise_multiplier=0.0), 0.01, 1000) == math.inf


def test_dp_compatible_model_has_no_batch_norm_or_in_place_activation() -> None:
    net = dp_compatible(build_model("small_cnn", 4, 8))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert not any(getattr(m, "inplace", False) for m in net.modules())


def test_defense_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="set prune_fraction"):
        DefenseConfig(finetune_epochs=2)
    with pytest.raises(ValidationError, match="fewer than train.epochs"):
        TrainConfig(epochs=3, defense=DefenseConfig(prune_fraction=0.5, finetune_epochs=3))
    with pytest.raises(ValidationError, match="dp trains on one device"):
        TrainConfig(devices=2, defense=DefenseConfig(dp=DPConfig()))


def _train_and_audit(tiny_run: Path, tmp_path: Path, defense: dict) -> tuple[dict, dict]:
    """Train the tiny marked model with `defense` on the tiny run's data (its upstream stages copied),
    then audit it."""
    source = Path(yaml.safe_load(tiny_run.read_text())["run_dir"])
    tree = yaml.safe_load(tiny_run.read_text())
    tree.update(run_dir=str(tmp_path / "run"), results_dir=str(tmp_path / "results"))
    tree["train"].update(arms=["marked"], defense=defense)
    config = tmp_path / "defended.yaml"
    config.write_text(yaml.safe_dump(tree))
    for stage in ("plan", "mark", "write"):
        shutil.copytree(source / stage, tmp_path / "run" / stage)
    for stage in ("train", "audit"):
        result = mtrack(stage, str(config), "--arm", "marked")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Warning" not in result.stderr, "a library's warning reached the console"
    return (
        read_json(tmp_path / "run" / "train-marked" / "metrics.json"),
        json.loads((tmp_path / "run" / "audit-marked" / "manifest.json").read_text()),
    )


@pytest.mark.slow
def test_tiny_model_trained_with_countermeasures_is_audited(tiny_run: Path, tmp_path: Path) -> None:
    defense = {
        "jpeg_quality": 75,
        "randaugment": {"per": "batch"},
        "mix": "cutmix",
        "outlier_fraction": 0.05,
        "prune_fraction": 0.5,
        "finetune_epochs": 1,
        "early_stopping_patience": 1,
    }
    metrics, audit = _train_and_audit(tiny_run, tmp_path, defense)
    assert metrics["sparsity"] >= 0.5, "pruned weights stay zero through fine-tuning"
    outliers = read_json(tmp_path / "run" / "train-marked" / "outliers.json")
    assert metrics["outliers"]["dropped"] == outliers["dropped"] >= 0.05 * 800
    assert metrics["outliers"]["marked"] == 4 * 8, "the marked training file knows its marked images"
    assert metrics["global_step"] < 3 * 12, "the outliers were left out of every epoch"
    assert 0 <= metrics["stopped_epoch"] < 3
    assert audit["outputs"], "the audit ran on the defended model"


@pytest.mark.slow
def test_tiny_model_trained_with_dp_sgd_is_audited(tiny_run: Path, tmp_path: Path) -> None:
    metrics, audit = _train_and_audit(tiny_run, tmp_path, {"dp": {"noise_multiplier": 1.0}})
    assert metrics["precision"] == "32-true"
    assert 0 < metrics["dp_epsilon"] < math.inf
    assert audit["outputs"], "the GroupNorm model loads in the audit"
