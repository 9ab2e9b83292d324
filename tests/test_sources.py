from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.sources import DataSourceError, load_source, read_idx, to_grid


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _fake_fashion_mnist(root: Path, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_directory(tmp_path: Path, compress: bool) -> None:
    images, labels = _fake_fashion_mnist(tmp_path, compress)
    splits = load_source(DataConfig(source="fashion_mnist", root=str(tmp_path), image_size=32, n_train=10))
    assert splits.train_images.shape == (30, 32, 32, 3) and splits.train_images.dtype == np.uint8
    # zero-padded by 2 on each side, grey replicated to RGB
    assert np.array_equal(splits.train_images[:, 2:30, 2:30, 1], images)
    assert (splits.train_images[:, :2] == 0).all()
    assert np.array_equal(splits.train_labels, labels)
    assert splits.num_classes == 10


def test_missing_and_truncated_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=str(tmp_path)):
        load_source(DataConfig(source="fashion_mnist", root=str(tmp_path), n_train=10))
    _fake_fashion_mnist(tmp_path, compress=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(DataSourceError, match="truncated"):
        read_idx(bad)


def test_installed_fashion_mnist_if_present() -> None:
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    splits = load_source(DataConfig(source="fashion_mnist", image_size=28, n_train=10))
    assert splits.train_images.shape == (60000, 28, 28, 3)
    assert splits.test_images.shape == (10000, 28, 28, 3)
    assert np.bincount(splits.train_labels).tolist() == [6000] * 10


def test_synthetic_is_deterministic_and_class_structured() -> None:
    cfg = DataConfig(source="synthetic", image_size=16, n_train=10, synthetic_per_class=50, synthetic_classes=4)
    a, b = load_source(cfg), load_source(cfg)
    assert np.array_equal(a.train_images, b.train_images)
    x = a.train_images.reshape(len(a.train_images), -1).astype(float)
    means = np.stack([x[a.train_labels == c].mean(0) for c in range(4)])
    within = np.mean([np.linalg.norm(x[a.train_labels == c] - means[c], axis=1).mean() for c in range(4)])
    assert a.train_images.std() > 20  # not flat
    # class means differ: nearest-class-mean classification beats chance clearly
    pred = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == a.train_labels).mean() > 0.5
    assert within > 0


def test_to_grid_resizes_large_images() -> None:
    big = np.full((2, 64, 48, 3), 200, dtype=np.uint8)
    out = to_grid(big, 32)
    assert out.shape == (2, 32, 32, 3) and (out == 200).all()


def test_class_subset_keeps_and_relabels_only_those_classes(tmp_path: Path) -> None:
    images, labels = _fake_fashion_mnist(tmp_path)
    cfg = DataConfig(
        source="fashion_mnist", root=str(tmp_path), image_size=28, n_train=10, classes=("shirt", "T-Shirt", 3)
    )  # names (any case) or indices; relabelled in source order
    splits = load_source(cfg)
    assert splits.classes == ("t-shirt", "dress", "shirt")
    kept = np.flatnonzero(np.isin(labels, [0, 3, 6]))
    assert np.array_equal(splits.train_images[..., 0], images[kept])
    assert splits.train_labels.tolist() == [{0: 0, 3: 1, 6: 2}[int(c)] for c in labels[kept]]
    assert len(splits.test_labels) == len(kept)
    with pytest.raises(DataSourceError, match="data.classes: 'socks' is not a class of fashion_mnist"):
        load_source(cfg.model_copy(update={"classes": ("shirt", "socks")}))
