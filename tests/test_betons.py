from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.betons import make_loader, read_all, write_beton


def _data(n: int = 37, size: int = 12):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, n)
    samples = rng.permutation(1000)[:n]
    users = np.arange(n) % 4
    return images, labels, samples, users


def test_raw_round_trip_is_lossless(tmp_path: Path) -> None:
    images, labels, samples, users = _data()
    path = tmp_path / "a.beton"
    write_beton(path, images, labels, samples, users)
    back = read_all(path, batch_size=8)  # 37 = 4 full batches + a partial one: nothing dropped
    assert torch.equal(back["image"], torch.from_numpy(images).permute(0, 3, 1, 2))
    assert back["label"].tolist() == labels.tolist()
    assert back["sample"].tolist() == samples.tolist()
    assert back["user"].tolist() == users.tolist()


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    images, labels, samples, _ = _data()
    path = tmp_path / "b.beton"
    try:
        write_beton(path, images, labels[:-1], samples)
    except Exception:
        pass
    assert not path.exists() and not list(tmp_path.iterdir())


def test_flip_is_per_sample_and_shuffle_is_seeded(tmp_path: Path) -> None:
    n, size = 64, 8
    # left half bright, right half dark: a flip is visible per image
    images = np.zeros((n, size, size, 3), np.uint8)
    images[:, :, : size // 2] = 255
    path = tmp_path / "c.beton"
    write_beton(path, images, np.zeros(n, int), np.arange(n))
    loader = make_loader(path, 64, 1, train=True, augment="flip", seed=3)
    batch = next(iter(loader))[0]
    flipped = (batch[:, 0, 0, 0] == 0).float().mean().item()
    assert 0.2 < flipped < 0.8, "all or none flipped: augmentation acts on the whole batch"
    # the shuffle order is a function of (seed, epoch) alone
    orders = []
    for _ in range(2):
        loader = make_loader(path, 16, 1, train=True, seed=3)
        loader.epoch = 2
        orders.append(torch.cat([b[2] for b in loader]).tolist())
    assert orders[0] == orders[1]
    assert sorted(orders[0]) == list(range(n))


def test_loader_keeps_torch_threads(tmp_path: Path) -> None:
    images, labels, samples, _ = _data()
    path = tmp_path / "d.beton"
    write_beton(path, images, labels, samples)
    for _ in make_loader(path, 8, 1, train=False, torch_threads=2):
        assert torch.get_num_threads() == 2
