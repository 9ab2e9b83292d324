"""What a stage's process costs: wall and CPU seconds, peak memory, bytes written.

Two peaks are kept, because they answer different questions. `peak_rss_mb` is the kernel's own
high-water mark (of this process or of its largest child): it includes pages of files the process
maps, such as a FFCV dataset that the loader memory-maps whole, which the page cache can drop at
any time. `peak_anon_mb` is what the job cannot do without: the anonymous memory (not backed by a file) of
the process and all its descendants together (FFCV's writer and loader workers; pages a forked
worker shares with its parent counted once), sampled by a background thread every 0.1 s; it is
the number that must not grow with the data.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

SAMPLE_S = 0.1


class AnonymousPeak:
    """Samples the anonymous memory of this process tree until the interpreter exits; one per process."""

    def __init__(self) -> None:
        self.peak = 0
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="memory-sampler", daemon=True).start()

    def sample(self) -> int:
        total = 0
        try:
            me = psutil.Process(self._pid)
            for process in [me, *me.children(recursive=True)]:
                total += anonymous_bytes(process)
        except psutil.Error:
            return self.peak
        self.peak = max(self.peak, total)
        return self.peak

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(SAMPLE_S)


def anonymous_bytes(process: psutil.Process) -> int:
    """A process's share of anonymous memory: its proportional share (Pss_Anon), so pages a forked
    worker still shares with its parent count once over the tree; resident minus file-backed and
    shared pages where the kernel has no smaps_rollup. 0 for a process that has ended."""
    try:
        with open(f"/proc/{process.pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        info = process.memory_info()
        return max(info.rss - info.shared, 0)
    except psutil.Error:
        return 0


_SAMPLER: AnonymousPeak | None = None


def start_sampling() -> None:
    """Start this process's sampler (a no-op when running; a forked child starts its own)."""
    global _SAMPLER
    if _SAMPLER is None or _SAMPLER._pid != os.getpid():
        _SAMPLER = AnonymousPeak()


def cpu_seconds() -> float:
    """CPU seconds this process and its finished children have used so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def usage_since(started: float, started_cpu: float, written: Sequence[Path]) -> dict[str, float]:
    """What a piece of work cost since (wall, CPU) start marks: seconds, CPU seconds, the two peaks
    of memory (see the module docstring) and the bytes of the files it wrote."""
    start_sampling()
    assert _SAMPLER is not None
    peak_kb = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "cpu_seconds": round(cpu_seconds() - started_cpu, 3),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_anon_mb": round(_SAMPLER.sample() / 2**20, 1),
        "bytes_written": int(sum(path.stat().st_size for path in written)),
    }
