"""Where out-of-distribution patterns come from: a folder of images or a dataset's test split."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig, MarkConfig
from ..core.marking import OODPool
from .images import ImageError, list_images, read_rgb
from .sources import load_source


def pool_from_folder(folder: str | Path) -> OODPool:
    files = list_images(folder)
    if not files:
        raise ImageError(f"{folder}: no image files to draw OOD patterns from")
    return OODPool(len(files), lambda i: read_rgb(Path(folder) / files[i]), str(folder))


def ood_pool(cfg: MarkConfig, image_size: int) -> OODPool | None:
    """The pool a config's `ood_image` pattern is drawn from (None for stripes)."""
    if cfg.pattern != "ood_image":
        return None
    if cfg.ood_folder:
        return pool_from_folder(cfg.ood_folder)
    source = load_source(DataConfig(source=cfg.ood_dataset, image_size=image_size, n_train=10))
    return OODPool.from_array(source.test_images, f"{cfg.ood_dataset} test split")
