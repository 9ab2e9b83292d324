from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.betons import ImageStorage, make_loader, read_all, write_beton
from pipeline.data.torchdata import make_torch_loader


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


def test_ids_kept_across_batches_stay_what_was_read(tmp_path: Path) -> None:
    """FFCV reuses its batch buffers: ids collected without copying (as the outlier filter and the
    record of trained samples do) read later batches' ids unless the loader hands out copies."""
    n = 2000
    path = tmp_path / "ids.beton"
    write_beton(path, np.zeros((n, 4, 4, 3), np.uint8), np.arange(n) % 10, np.arange(n), np.arange(n) % 7 - 1)
    kept = list(make_loader(path, 128, 2, train=False))
    for field, expected in ((1, np.arange(n) % 10), (2, np.arange(n)), (3, np.arange(n) % 7 - 1)):
        assert np.array_equal(np.concatenate([batch[field].numpy() for batch in kept]), expected)


def test_loader_keeps_torch_threads(tmp_path: Path) -> None:
    images, labels, samples, _ = _data()
    path = tmp_path / "d.beton"
    write_beton(path, images, labels, samples)
    for _ in make_loader(path, 8, 1, train=False, torch_threads=2):
        assert torch.get_num_threads() == 2


def _storage_data(n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth images (ramps with a per-image colour, little noise): JPEG changes them, but only a little."""
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 120, 32)[None, :, None, None] + np.linspace(0, 60, 32)[None, None, :, None]
    images = ramp + rng.integers(20, 70, (n, 1, 1, 3)) + rng.normal(0, 3, (n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), rng.integers(0, 3, n), np.arange(100, 100 + n)


def test_every_record_follows_the_storage_decision_of_its_sample_id(tmp_path: Path) -> None:
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    images, labels, samples = _storage_data()
    storage = ImageStorage(mode="proportion", compress_probability=0.5, jpeg_quality=75, seed=7)
    modes = []
    for name in ("a.beton", "b.beton"):
        write_beton(tmp_path / name, images, labels, samples, storage=storage, num_workers=2)
        modes.append(Reader(str(tmp_path / name)).metadata["f0"]["mode"])
    assert np.array_equal(modes[0], modes[1]), "the JPEG draw must not depend on the write"
    as_jpeg = modes[0] == IMAGE_MODES["jpg"]
    assert np.array_equal(as_jpeg, storage.as_jpeg(samples)) and 0 < as_jpeg.sum() < len(images)
    # the decision belongs to the sample id, not to the file or the record's position in it
    write_beton(tmp_path / "c.beton", images[::-1], labels[::-1], samples[::-1], storage=storage)
    assert np.array_equal(Reader(str(tmp_path / "c.beton")).metadata["f0"]["mode"], modes[0][::-1])
    back = read_all(tmp_path / "a.beton")["image"].permute(0, 2, 3, 1).numpy()
    assert np.array_equal(back[~as_jpeg], images[~as_jpeg])  # raw records are exact
    assert (
        not np.array_equal(back[as_jpeg], images[as_jpeg])
        and np.abs(back[as_jpeg] - images[as_jpeg].astype(int)).mean() < 5
    )


def test_images_of_varying_size_are_stored_at_their_size(tmp_path: Path) -> None:
    from ffcv.reader import Reader

    from pipeline.data.sources import StoredImages

    images, labels, samples = _storage_data(6)
    stored = StoredImages(images, max_resolution=16)
    varying = [images[0]] + [stored[i] for i in range(1, 6)]  # one image as given, the others shrunk
    write_beton(tmp_path / "r.beton", varying, labels, samples, storage=ImageStorage(mode="jpg"))
    meta = Reader(str(tmp_path / "r.beton")).metadata["f0"]
    assert meta["width"].tolist() == [32] + [16] * 5 and meta["height"].tolist() == [32] + [16] * 5
    # images of two sizes need a cropping decoder: random-resized for training, centre crop for evaluation
    batch = next(iter(make_loader(tmp_path / "r.beton", 6, 1, train=False, resolution=12)))[0]
    assert batch.shape == (6, 3, 12, 12)


def _ids(loader) -> tuple[list[int], list[int]]:
    samples, labels = [], []
    for batch in loader:
        samples += batch[2].tolist()
        labels += batch[1].tolist()
    return samples, labels


@pytest.mark.parametrize("resolution", [None, 24])
def test_torch_loader_matches_ffcv(tmp_path: Path, resolution: int | None) -> None:
    images, labels, samples = _storage_data(37)
    path = tmp_path / "t.beton"
    write_beton(path, images, labels, samples, storage=ImageStorage(mode="proportion", seed=1))
    kwargs = dict(augment="flip_translate", translate_pixels=2, seed=3, resolution=resolution)
    for train in (False, True):
        ffcv_loader = make_loader(path, 8, 1, train=train, **kwargs)
        torch_loader = make_torch_loader(path, 8, 1, train=train, **kwargs)
        assert len(ffcv_loader) == len(torch_loader) == (4 if train else 5)
        for epoch in (0, 1):
            ffcv_loader.epoch = torch_loader.epoch = epoch
            assert _ids(ffcv_loader) == _ids(torch_loader)  # same order, same labels, same batches dropped
        if not train:
            ffcv_batch, torch_batch = next(iter(ffcv_loader)), next(iter(torch_loader))
            assert ffcv_batch[0].shape == torch_batch[0].shape and torch_batch[0].dtype == torch.uint8
            assert torch_batch[0].is_contiguous(memory_format=torch.channels_last)
            raw = ~ImageStorage(mode="proportion", seed=1).as_jpeg(samples[:8])
            if resolution is None:  # stored pixels: identical wherever they are raw
                assert torch.equal(ffcv_batch[0][raw], torch_batch[0][raw])
    epoch_ids = _ids(make_torch_loader(path, 8, 1, train=True, **kwargs))[0]
    assert len(set(epoch_ids)) == 32 and set(epoch_ids) <= set(samples.tolist())
