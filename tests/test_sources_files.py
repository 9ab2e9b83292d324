"""File-backed sources: ImageNet-style and Tiny-ImageNet-style image folders (lazy), CIFAR archives."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.common import write_jpeg_folder
from pipeline.config import DataConfig
from pipeline.data.images import ImageError
from pipeline.data.sources import DataSourceError, ImageFiles, full_resolution, load_source

SIZES = ((40, 30), (24, 36), (16, 16))


def _imagenet(root: Path) -> Path:
    write_jpeg_folder(root, "train", n_classes=3, per_class=5, sizes=SIZES, seed=0)
    write_jpeg_folder(root, "val", n_classes=3, per_class=2, sizes=SIZES, seed=1)
    return root


def test_imagefolder_is_sorted_lazy_and_on_the_grid(tmp_path: Path) -> None:
    root = _imagenet(tmp_path / "imagenet")
    data = load_source(DataConfig(source="imagefolder", root=str(root), image_size=20, n_train=10, n_test=4))
    assert data.classes == ("class-000", "class-001", "class-002")
    assert isinstance(data.train_images, ImageFiles) and isinstance(data.test_images, ImageFiles)
    assert data.train_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert data.train_images.files[:2] == ["train/class-000/img-0000.JPEG", "train/class-000/img-0001.JPEG"]
    assert len(data.test_images) == 4 and data.test_labels.tolist() == [0, 0, 1, 1]  # n_test is a lazy slice
    one = data.train_images[6]
    batch = data.train_images[[6, 0]]
    assert one.shape == (20, 20, 3) and one.dtype == np.uint8 and batch.shape == (2, 20, 20, 3)
    assert np.array_equal(batch[0], one)
    decoded = np.asarray(Image.open(root / data.train_images.files[6]).convert("RGB"))
    assert np.array_equal(full_resolution(data.train_images)[6], decoded)  # own size, for the writer
    assert data.train_images[2].shape == (20, 20, 3)  # a 16x16 file is padded onto the grid


def test_tiny_imagenet_validation_layout(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    write_jpeg_folder(root, "train", n_classes=2, per_class=3, sizes=((16, 16),))
    (root / "train" / "class-000" / "class-000_boxes.txt").write_text("not an image\n")
    images = root / "val" / "images"
    images.mkdir(parents=True)
    rows = [("val_1.JPEG", "class-001"), ("val_0.JPEG", "class-000"), ("val_2.JPEG", "class-001")]
    for name, _ in rows:
        Image.new("RGB", (16, 16), (10, 20, 30)).save(images / name)
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{c}\t0\t0\t8\t8\n" for n, c in rows))
    data = load_source(DataConfig(source="imagefolder", root=str(root), image_size=16, n_train=10))
    assert len(data.train_images) == 6
    assert data.test_images.files == ["val/images/val_0.JPEG", "val/images/val_1.JPEG", "val/images/val_2.JPEG"]
    assert data.test_labels.tolist() == [0, 1, 1]
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn999\t0\t0\t8\t8\n")
    with pytest.raises(DataSourceError, match=r"val_annotations.txt:1: class 'n999'"):
        load_source(DataConfig(source="imagefolder", root=str(root), image_size=16, n_train=10))


def test_imagefolder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"needs data.root: pass --set data.root="):
        load_source(DataConfig(source="imagefolder", n_train=10))
    with pytest.raises(DataSourceError, match=str(tmp_path / "nowhere" / "train")):
        load_source(DataConfig(source="imagefolder", root=str(tmp_path / "nowhere"), n_train=10))
    root = _imagenet(tmp_path / "imagenet")
    (root / "val" / "class-777").mkdir()
    with pytest.raises(DataSourceError, match="class-777: class folder not in train/"):
        load_source(DataConfig(source="imagefolder", root=str(root), n_train=10))
    (root / "val" / "class-777").rmdir()
    broken = root / "train" / "class-000" / "img-0000.JPEG"
    broken.write_bytes(b"not a jpeg")
    data = load_source(DataConfig(source="imagefolder", root=str(root), n_train=10))  # listing reads no pixels
    with pytest.raises(ImageError, match=str(broken)):
        data.train_images[0]


def _fake_cifar(root: Path, name: str, per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A tiny archive in the official format: pickled dicts with bytes keys, rows of 3072 channel-planar pixels."""
    rng = np.random.default_rng(3)
    layouts = {
        "cifar10": (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
            b"labels",
            b"label_names",
            10,
        ),
        "cifar100": ("cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names", 100),
    }
    folder_name, train, test, meta, label_key, names_key, n_classes = layouts[name]
    folder = root / folder_name
    folder.mkdir(parents=True)
    all_rows, all_labels = [], []
    for batch in train + [test]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, per_batch).tolist()
        (folder / batch).write_bytes(pickle.dumps({b"data": rows, label_key: labels, b"batch_label": b"x"}))
        all_rows.append(rows)
        all_labels.append(labels)
    (folder / meta).write_bytes(pickle.dumps({names_key: [f"c{i}".encode() for i in range(n_classes)]}))
    return np.concatenate(all_rows), np.concatenate(all_labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive(tmp_path: Path, name: str) -> None:
    rows, labels = _fake_cifar(tmp_path, name)
    data = load_source(DataConfig(source=name, root=str(tmp_path), image_size=32, n_train=10))
    n_train = len(data.train_labels)
    assert data.train_images.shape == (n_train, 32, 32, 3) and data.num_classes == (10 if name == "cifar10" else 100)
    assert data.train_labels.tolist() == labels[:n_train].tolist()
    assert data.test_labels.tolist() == labels[n_train:].tolist()
    first = rows[0].reshape(3, 32, 32)
    assert np.array_equal(data.train_images[0, 5, 7], first[:, 5, 7])  # channel-planar rows become HWC


def test_cifar_missing_archive_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"batches.meta: not found"):
        load_source(DataConfig(source="cifar10", root=str(tmp_path), n_train=10))
