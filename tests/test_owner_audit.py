"""A data owner's audit with the secret-pattern design: exact p-values from re-marking the originals
under every candidate pattern, for a model that memorised the published images and for ones that
never saw them, given as black-box callables and as a checkpoint on the command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig, MarkConfig
from pipeline.data.images import read_rgb
from pipeline.core.models import Normalized, build_model, save_weights
from pipeline.owner.audit import audit_owner
from pipeline.owner.key import KEY_NAME, load_key
from pipeline.owner.marking import mark_folder
from pipeline.data.sources import load_source
from pipeline.store import StageError

N_PATTERNS = 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The owner's 12 images of class 0, marked; other data of 4 classes for training."""
    tmp = tmp_path_factory.mktemp("owner")
    data = load_source(DataConfig(source="synthetic", image_size=16, n_train=10, synthetic_per_class=200,
                                  synthetic_classes=4))
    originals = tmp / "originals"
    originals.mkdir()
    owner_ids = np.flatnonzero(data.train_labels == 0)[:12]
    for i in owner_ids:
        Image.fromarray(data.train_images[i]).save(originals / f"img{i}.png")
    key = mark_folder(originals, tmp / "marked", MarkConfig(), seed=11, n_patterns=N_PATTERNS, label=0)
    others = np.setdiff1d(np.arange(len(data.train_labels)), owner_ids)
    return tmp, data, key, others


class NearestNeighbour:
    """A 1-nearest-neighbour classifier as a black-box model: the purest memoriser (every training
    image is recalled exactly), logits = minus the mean squared pixel distance to each class's nearest image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_classes: int = 4) -> None:
        self.train = torch.from_numpy(images).permute(0, 3, 1, 2).reshape(len(images), -1).float() / 255
        self.labels, self.n_classes = torch.from_numpy(labels), n_classes

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        dist = torch.cdist(batch.reshape(len(batch), -1).float() / 255, self.train) ** 2 / self.train.shape[1]
        return torch.stack([-dist[:, self.labels == c].min(dim=1).values for c in range(self.n_classes)], dim=1) * 200


def test_model_that_memorised_the_published_images_gets_the_smallest_p(world) -> None:
    tmp, data, key, others = world
    published = np.stack([read_rgb(tmp / "marked" / e["marked"]) for e in key["files"]])
    model = NearestNeighbour(np.concatenate([data.train_images[others[:300]], published]),
                             np.concatenate([data.train_labels[others[:300]], np.zeros(len(published), np.int64)]))
    result = audit_owner(load_key(tmp / "marked" / KEY_NAME, tmp / "marked"), model)
    assert result["p_value"] == pytest.approx(1 / N_PATTERNS)
    assert result["published_pattern_loss"] < result["other_patterns_loss"]["min"]


def test_model_that_never_saw_them_gives_valid_p_values(world) -> None:
    """Owners whose images were not used: their p-values spread over (0, 1] (exchangeable ranks)."""
    tmp, data, key, others = world
    model = NearestNeighbour(data.train_images[others[:300]], data.train_labels[others[:300]])
    p_values = []
    for seed in range(10):
        k = mark_folder(tmp / "originals", tmp / f"unused{seed}", MarkConfig(), seed=100 + seed,
                        n_patterns=N_PATTERNS, label=0)
        p_values.append(audit_owner(k, model)["p_value"])
    assert sum(p <= 0.1 for p in p_values) <= 3  # P(p <= 0.1) = 0.1 under the null; 3 of 10 is generous
    assert max(p_values) > 0.5


def test_command_line_verdict_and_wrong_key(world, tmp_path: Path) -> None:
    tmp, data, key, others = world
    model = Normalized(build_model("small_cnn", 4, 16), (0.5,) * 3, (0.25,) * 3).eval()
    weights = tmp_path / "model.pt"
    save_weights(model, {"arch": "small_cnn", "width": 16, "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3},
                 weights)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "audit", "--model", str(weights),
                             "--user", str(tmp / "marked")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "verdict:" in result.stdout and "p = " in result.stdout
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.png").write_bytes((tmp / "marked" / key["files"][0]["marked"]).read_bytes()[:-10])
    with pytest.raises(StageError, match="another folder"):
        load_key(tmp / "marked" / KEY_NAME, other)
