"""Learning-rate schedules: warm-up, then linear / cosine / multistep decay, step by step."""

from __future__ import annotations

import pytest

from pipeline.config import TrainConfig
from pipeline.training.schedules import lr_factor

STEPS_PER_EPOCH, EPOCHS = 10, 100


def _factors(**overrides) -> list[float]:
    cfg = TrainConfig(epochs=EPOCHS, **overrides)
    factor = lr_factor(cfg, STEPS_PER_EPOCH, STEPS_PER_EPOCH * EPOCHS)
    return [factor(step) for step in range(STEPS_PER_EPOCH * EPOCHS)]


def test_multistep_multiplies_at_milestone_epochs() -> None:
    f = _factors(schedule="multistep", milestones=(60, 80, 90), gamma=0.2)
    for epoch, expected in ((0, 1.0), (59, 1.0), (60, 0.2), (79, 0.2), (80, 0.04), (90, 0.008), (99, 0.008)):
        assert f[epoch * STEPS_PER_EPOCH] == pytest.approx(expected), epoch


def test_warmup_then_linear_decay_to_zero() -> None:
    f = _factors(schedule="linear", warmup_epochs=2)
    warmup = 2 * STEPS_PER_EPOCH
    assert f[0] == pytest.approx(1 / warmup) and f[warmup - 1] == pytest.approx(1.0)
    assert f[warmup] == pytest.approx(1.0) and f[-1] == pytest.approx(1 / (len(f) - warmup))
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1 :]))


def test_cosine_ends_near_zero_and_bad_schedules_are_refused() -> None:
    f = _factors(schedule="cosine")
    assert f[0] == 1.0 and f[len(f) // 2] == pytest.approx(0.5, abs=1e-3) and f[-1] < 1e-4
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(schedule="multistep")
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(schedule="onecycle", warmup_epochs=1)


@pytest.mark.parametrize("name, kind", [("sgd", "SGD"), ("adamw", "AdamW")])
def test_optimizer_follows_config_and_spares_norms_and_biases_from_decay(name: str, kind: str) -> None:
    import torch

    from pipeline.training.module import OPTIMIZERS

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    cfg = TrainConfig(optimizer=name, lr=0.01, weight_decay=0.05, momentum=0.8)
    opt = OPTIMIZERS.lookup(cfg.optimizer)(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], cfg
    )
    assert type(opt).__name__ == kind and [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    first_moment = opt.param_groups[0]["betas"][0] if kind == "AdamW" else opt.param_groups[0]["momentum"]
    assert first_moment == 0.8
