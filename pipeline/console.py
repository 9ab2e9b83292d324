"""What a person watching a run sees: the pipeline's log lines, time-stamped, on stderr."""
from __future__ import annotations

import logging


def stderr_log_handler() -> logging.Handler:
    """The pipeline's log lines on stderr with a time stamp, for the CLI and SLURM jobs alike."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    return handler
