"""Read the model's weight files into the page cache while the worker is still importing.

A cold worker spends its first 20 s or so importing torch, transformers and diffusers before
it can read a single weight, and then reads ~58 GB. Reading the files from a background
thread at process start overlaps the two: by the time `from_pretrained` asks for the weights,
much of them is in memory. Only the model already on disk is read (nothing is downloaded
here), and only when the machine has the memory to keep it cached; otherwise the reads would
evict each other and cost disk bandwidth for nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger("qwen_edit_worker.prefetch")

CHUNK = 16 << 20
HEADROOM = 1.2  # the files must fit in available memory this many times over


def weight_files(model_path: str) -> list[Path]:
    return sorted(Path(model_path).glob("*/*.safetensors"))


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def read_all(files: list[Path]) -> int:
    buffer = bytearray(CHUNK)
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as stream:
            while count := stream.readinto(buffer):
                total += count
    return total


def start(model_path: str | None, memory: int | None = None) -> threading.Thread | None:
    """Start reading `model_path`'s weights in a daemon thread; None when there is nothing to
    read or not enough memory to keep it."""
    if model_path is None:
        return None
    files = weight_files(model_path)
    size = sum(file.stat().st_size for file in files)
    memory = available_memory() if memory is None else memory
    if not files or size * HEADROOM > memory:
        if files:
            log.info("weights not prefetched: %.1f GB would not stay cached in %.1f GB of free memory", size / 1e9, memory / 1e9)
        return None

    def run():
        began = time.perf_counter()
        try:
            total = read_all(files)
        except OSError as error:  # best effort: the loader reads them anyway
            log.info("weights prefetch stopped: %s", error)
            return
        seconds = time.perf_counter() - began
        log.info("weights prefetched into memory: %.1f GB in %.1f s (%.2f GB/s)", total / 1e9, seconds, total / 1e9 / seconds)

    thread = threading.Thread(target=run, name="weights-prefetch", daemon=True)
    thread.start()
    return thread
