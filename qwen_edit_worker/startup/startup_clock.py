"""Time since this process started, for the cold-start log: every start-up stage says when it
ended, so that a user sees where a new worker's first minute goes (imports, reading weights,
fusing, compiling)."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("qwen_edit_worker.startup")

_IMPORTED = time.monotonic()


def seconds_since_start() -> float:
    """From the kernel's start time of this process (Linux); elsewhere, since this module loaded."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks after boot
        with open("/proc/uptime") as uptime:
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def mark(stage: str) -> None:
    log.info("cold start: %s, %.1f s after the process started", stage, seconds_since_start())


@contextmanager
def timed(logger: logging.Logger, what: str) -> Iterator[None]:
    """Log how long the block took and when it ended after the process started."""
    start = time.perf_counter()
    yield
    logger.info("%s took %.2f s (done %.1f s after the process started)", what, time.perf_counter() - start,
                seconds_since_start())  # fmt: skip
