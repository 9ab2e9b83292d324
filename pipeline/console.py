"""What a person watching a run sees: a time-stamped line when each stage starts and ends, progress
of the long loops (training epochs, marking, scoring) and nothing else from the libraries below us.

Progress is a live bar on a terminal and, in a batch log (SLURM, CI, a file), plain lines at most
every `LINE_INTERVAL_S` seconds plus one at the end, so a log says how far a run got without
filling up with carriage-return updates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
LINE_INTERVAL_S = 10.0
log = logging.getLogger("pipeline")

# Library messages that say nothing about this run (checked against the pinned versions):
NOISE = (
    r"The `srun` command is available on your system but is not used",  # Lightning, on any machine with SLURM
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 calling torch's pytree
    r".*does not have many workers which may be a bottleneck",  # Lightning on FFCV loaders (threads, not workers)
    r"Found \d+ module\(s\) in eval mode at the start of training",  # a frozen backbone (train.finetune: head)
    r"Checkpoint directory .* exists and is not empty",  # a resumed training: the pipeline logs the resume itself
    r"Full backward hook is firing when gradients are computed with respect to module outputs",  # Opacus's hooks
    r"grad and param do not obey the gradient layout contract",  # Opacus's per-sample sums on channels_last weights
)


class _OursOrWarnings(logging.Filter):
    """The pipeline's own lines at every level, other libraries' only from WARNING up: Lightning
    logs at INFO what accelerator it found, tips advertising products and that `fit` stopped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "pipeline" or record.name.startswith("pipeline.") or record.levelno >= logging.WARNING


class _Console(logging.StreamHandler):
    """The pipeline's console handler: one per process, however many commands run in it."""


def attach_console() -> logging.Handler | None:
    """Send log lines to stderr with a time stamp (the CLI and SLURM jobs alike) and keep library
    chatter off the console; returns the handler, or None where the console is attached already (a
    benchmark running the CLI in its own process), so each caller detaches only what it attached.
    The handler sits on the root logger before Lightning is imported, so Lightning adds no handler
    of its own and its records pass the filter above."""
    if any(isinstance(h, _Console) for h in logging.getLogger().handlers):
        return None
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    if not sys.stderr.isatty():  # FFCV's writer bars: carriage returns that make one endless line in a log
        os.environ.setdefault("TQDM_DISABLE", "1")
    handler = _Console()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(_OursOrWarnings())
    logging.getLogger().addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def console() -> Iterator[None]:
    """The console for one command: attached unless it is already, and detached after, so a command
    run again in one process (tests, a benchmark calling the CLI) logs each line once."""
    handler = attach_console()
    try:
        yield
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)


def clock(seconds: float) -> str:
    """12:03:04, 3:04 or 0:04."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress of one long loop of `total` steps: `update(done, detail)` or `advance()` as it goes.

    On a terminal a rich bar (description, bar, count, elapsed, time left); otherwise a line
    `<label>: <prefix><done>/<total><unit> (<pct>%), <detail>, <elapsed> elapsed, ETA <left>` at most
    every LINE_INTERVAL_S seconds and when the loop ends. `start` counts steps done before this
    process (a resumed run), so the ETA follows the rate of this process only."""

    def __init__(
        self, label: str, total: int, unit: str = "", start: int = 0, live: bool | None = None, prefix: str = ""
    ) -> None:
        self.label, self.total, self.unit, self.prefix = label, max(total, 1), unit, prefix
        self.done: float = start
        self.start = start
        self.detail = ""
        self.began = self.last_line = time.monotonic()
        self.bar: Any = None
        if sys.stderr.isatty() if live is None else live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task(self.counts(), total=self.total, completed=start)
            self.bar.start()

    def counts(self) -> str:
        """`<label>: <prefix><done>/<total> <unit> (<pct>%)[, <detail>]`."""
        detail = f", {self.detail}" if self.detail else ""
        return (
            f"{self.label}: {self.prefix}{int(self.done)}/{self.total}{' ' + self.unit if self.unit else ''} "
            f"({100 * self.done / self.total:.0f}%){detail}"
        )

    def line(self) -> str:
        elapsed = time.monotonic() - self.began
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = clock((self.total - self.done) / rate) if rate > 0 else "?"
        return f"{self.counts()}, {clock(elapsed)} elapsed, ETA {eta}"

    @property
    def live(self) -> bool:
        return self.bar is not None

    def advance(self, steps: float = 1) -> None:
        self.update(self.done + steps)

    def update(self, done: float, detail: str | None = None) -> None:
        self.done = min(done, self.total)
        self.detail = self.detail if detail is None else detail
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=self.counts())
        elif self.done == self.total or time.monotonic() - self.last_line >= LINE_INTERVAL_S:
            self.last_line = time.monotonic()
            log.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def track(items: Iterable[T], label: str, total: int, unit: str = "") -> Iterator[T]:
    """Iterate over `items`, showing progress (see `Progress`)."""
    progress = Progress(label, total, unit)
    try:
        for item in items:
            yield item
            progress.advance()
    finally:
        progress.close()
