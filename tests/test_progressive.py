"""Progressive resizing: the crop size per epoch, and both loaders changing it between epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.data.betons import make_loader, write_beton
from pipeline.data.torchdata import make_torch_loader


def test_resolution_grows_between_the_ramp_epochs_as_ffcv_rounds_it() -> None:
    cfg = TrainConfig(resolution=192, min_resolution=160, resize_epochs=(65, 76), epochs=88)
    sizes = [cfg.resolution_at(e) for e in range(88)]
    # FFCV's rn50 recipe: the interpolation rounded to the nearest multiple of 32 reaches 192 px
    # once it passes 176 px, at epoch 65 + 11 * 16 / 32 = 70.5, i.e. from epoch 71 on
    assert sizes == [160] * 71 + [192] * 17
    wide = TrainConfig(resolution=256, min_resolution=128, resize_epochs=(10, 14), epochs=20)
    assert [wide.resolution_at(e) for e in range(9, 16)] == [128, 128, 160, 192, 224, 256, 256]
    with pytest.raises(ValueError, match="min_resolution"):
        TrainConfig(min_resolution=160)


@pytest.mark.parametrize("build", [make_loader, make_torch_loader])
def test_loaders_crop_to_the_new_size_from_the_next_epoch(build, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.beton"
    write_beton(path, rng.integers(0, 256, (32, 40, 40, 3), dtype=np.uint8), np.zeros(32, np.int64), np.arange(32))
    loader = build(path, 8, 1, train=True, augment="flip", resolution=16)
    assert next(iter(loader))[0].shape[-2:] == (16, 16)
    loader.set_resolution(24)
    loader.epoch = 1
    assert {tuple(batch[0].shape[-2:]) for batch in loader} == {(24, 24)}
