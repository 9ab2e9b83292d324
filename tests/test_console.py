"""The console: progress a person can follow, and nothing from the libraries they did not ask for."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from pipeline import console
from pipeline.console import Progress, clock


def test_plain_progress_lines_are_throttled_and_give_an_eta(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.INFO, logger="pipeline")
    progress = Progress("train-marked", 10, start=2, prefix="epoch ", live=False)
    for epoch in range(3, 11):
        now[0] += 4.0  # 4 s per epoch: a line every 10 s at most, and the last one
        progress.update(epoch, f"loss {1 / epoch:.3g}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "train-marked: epoch 5/10 (50%), loss 0.2, 0:12 elapsed, ETA 0:20"
    assert lines[-1] == "train-marked: epoch 10/10 (100%), loss 0.1, 0:32 elapsed, ETA 0:00"
    assert len(lines) == 3


def test_clock() -> None:
    assert [clock(s) for s in (4, 184, 3 * 3600 + 65)] == ["0:04", "3:04", "3:01:05"]


@pytest.mark.slow
def test_a_run_prints_its_stages_and_progress_and_nothing_else(tiny_run: Path) -> None:
    lines = [line for line in (tiny_run.parent / "console.log").read_text().splitlines() if line.strip()]
    stray = [line for line in lines if not re.match(r"\d\d:\d\d:\d\d pipeline: ", line)]
    assert not stray, f"lines the pipeline did not write: {stray[:5]}"
    text = "\n".join(lines)
    for stage in ("plan", "mark", "write", "train-marked", "train-control", "audit-marked", "audit-control", "report"):
        assert f"pipeline: {stage}: running" in text
    assert re.search(r"train-marked: epoch 3/3 \(100%\), loss [\d.e-]+, acc [\d.]+, \d+:\d\d elapsed, ETA 0:00", text)
    assert len(lines) <= 40, "the whole run's console output should fit on one screen"
