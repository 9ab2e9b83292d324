"""Countermeasures against the audit (`train.defense`), one plug-in module each; every module of
this package is imported here, so adding one is adding its file (and its `train.defense` key)."""

from __future__ import annotations

import importlib
import pkgutil

from ...config import TrainConfig
from .base import COUNTERMEASURES, Countermeasure

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def active(cfg: TrainConfig, num_classes: int) -> list[Countermeasure]:
    """The countermeasures the config switches on, in the order their batch transforms apply."""
    on = [
        COUNTERMEASURES.lookup(name)
        for name in COUNTERMEASURES.names()
        if getattr(cfg.defense, name) not in (None, 0, 0.0)
    ]
    return [cls(cfg, num_classes) for cls in sorted(on, key=lambda cls: cls.order)]


__all__ = ["COUNTERMEASURES", "Countermeasure", "active"]
