"""Training-step throughput: our Lightning module against a plain PyTorch loop.

Both train the same model (`Classifier`'s normalised small CNN, channels-last, fp32) with SGD at
the same rate, momentum and weight decay on the same batches, held in memory so that only the training step is timed:
- ours: `Classifier` under `lightning.Trainer` (one epoch over the batches, timed from the epoch's
  start to its end, so every per-step hook, the optimizer closure and the epoch's loss/accuracy
  logging count, but not the Trainer's one-off setup; no checkpointing, progress bar or validation);
- baseline: `zero_grad / forward / cross_entropy / backward / step` in a Python loop.
They take turns within each repeat so machine load hits them alike. Run `python -m bench.lightning`
from the repository root; it writes results/bench/lightning.json and its results/bench/README.md line.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import lightning as L
import torch
import torch.nn.functional as F

from bench.common import comparison, interleaved_medians, publish, run_reporting_errors
from pipeline.config import TrainConfig
from pipeline.training.module import Classifier

SIZE, BATCH, STEPS, WIDTH, REPEATS = 32, 128, 30, 32, 3
CONFIG = TrainConfig(
    arch="small_cnn",
    width=WIDTH,
    batch_size=BATCH,
    lr=0.05,
    schedule="constant",
    precision="32-true",
    accelerator="cpu",
)


def make_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator).contiguous(
                memory_format=torch.channels_last
            ),
            torch.randint(0, 10, (BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def new_module() -> Classifier:
    torch.manual_seed(0)
    return Classifier(CONFIG.arch, 10, CONFIG.width, [0.5] * 3, [0.25] * 3, CONFIG.model_dump(mode="json"))


class InMemoryBatches(L.LightningDataModule):
    """The batches as the data module `Classifier` expects (no epoch-ordered loader to advance)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.batches, self.train_loader = batches, None

    def train_dataloader(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return BatchList(self.batches)


class BatchList:
    """One iterable over the batches (Lightning would read a bare list as a list of loaders)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def lightning_rate(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        precision="32-true",
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(new_module(), datamodule=InMemoryBatches(batches))
    return len(batches) * BATCH / timer.seconds


def plain_rate(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model = new_module().model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=CONFIG.lr, momentum=CONFIG.momentum, nesterov=True, weight_decay=CONFIG.weight_decay
    )
    start = time.perf_counter()
    for images, labels in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
    return len(batches) * BATCH / (time.perf_counter() - start)


def main() -> None:
    batches = make_batches()
    sides = {"lightning": lightning_rate, "plain": plain_rate}
    for run in sides.values():  # warm-up: oneDNN kernels, allocator, Lightning imports
        run(batches[:3])
    median = interleaved_medians({name: (lambda run=run: run(batches)) for name, run in sides.items()}, REPEATS)
    where = f"small_cnn width {WIDTH}, {SIZE}x{SIZE}, batch {BATCH}, {STEPS} steps, fp32, cpu"
    row = comparison(f"Lightning Classifier vs plain PyTorch loop, {where}", median["lightning"], median["plain"])
    slower = (1 - row["ratio"]) * 100
    publish(
        "lightning.json",
        [row],
        (
            f"- `lightning.json` — training-step throughput ({where}; a shared 2-core machine): the Lightning module "
            f"runs at {row['ratio']:.3f}× a plain PyTorch loop "
            f"({median['lightning']:.0f} vs {median['plain']:.0f} img/s, "
            f"{slower:.1f}% {'slower' if slower >= 0 else 'faster'})"
        ),
    )


if __name__ == "__main__":
    run_reporting_errors(main)
