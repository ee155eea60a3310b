"""Read the model's weight files into the page cache while the worker is still importing.

A cold worker spends its first 20 s or so importing torch, transformers and diffusers before
it can read a single weight, and then reads ~58 GB. Reading the files from a background
thread from the process's first moment (`handler.py` starts it before importing torch)
overlaps the two: by the time `from_pretrained` asks for the weights, much of them is in
memory. Small reads leave the imports their turn at the disk; once `imports_done` is called,
large reads take it. The files are read in the order the loader needs them (`model_loader`: the
transformer, the VAE and the Lightning LoRA, which are compiled while the text encoder is
still being read). Only files already on disk are read (nothing is downloaded here), and only
when the machine has the memory to keep them cached; otherwise the reads would evict each
other and cost disk bandwidth for nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger("qwen_edit_worker.prefetch")

# Small reads while the process imports: the imports' own small reads then get their turn at
# the disk. With 16 MiB reads a cold worker's imports took 40-51 s instead of 24 s alone; with
# 128 KiB, 27-32 s, and the read ended 2-5 s later (H200, `benchmarks/import_contention.py`).
CHUNK = 128 << 10
# Large reads once the imports are done (`imports_done`): nothing needs the small reads' fairness
# then, and the rest of the weights is what the start waits for. A whole prefetch in 128 KiB
# reads averaged 0.64-0.82 GB/s where one 16 MiB read of the same files alone ran at
# 1.50-1.86 GB/s; switching after the imports, the 58.5 GB were in memory at 62 s instead of
# 72 (H200, `benchmarks/cold_start.py`).
BULK_CHUNK = 16 << 20
HEADROOM = 1.2  # the files must fit in available memory this many times over


LOAD_ORDER = ("transformer", "vae", "lightning", "text_encoder")


def weight_files(model_path: str, lightning: str | None = None) -> list[Path]:
    """The pipeline's weight files (and the Lightning file), in `LOAD_ORDER`."""
    files = sorted(Path(model_path).glob("*/*.safetensors"))
    if lightning is not None:
        files.append(Path(lightning))

    def rank(file: Path) -> int:
        part = "lightning" if file == Path(lightning or "") else file.parent.name
        return LOAD_ORDER.index(part) if part in LOAD_ORDER else len(LOAD_ORDER)

    return sorted(files, key=rank)  # stable: a component's shards stay in order


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


_imports_done = threading.Event()


def imports_done() -> None:
    """The process has imported its libraries: the prefetch goes on with large reads."""
    _imports_done.set()


def read_all(files: list[Path], chunk: int | None = None, bulk_after: threading.Event | None = None) -> int:
    """Read every byte of `files` once, `chunk` bytes at a time (default `CHUNK`), and
    `BULK_CHUNK` at a time once `bulk_after` is set; the bytes read."""
    buffer = memoryview(bytearray(max(chunk or CHUNK, BULK_CHUNK if bulk_after is not None else 0)))
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as stream:
            while True:
                size = BULK_CHUNK if bulk_after is not None and bulk_after.is_set() else chunk or CHUNK
                if not (count := stream.readinto(buffer[:size])):
                    break
                total += count
    return total


def start(model_path: str | None, lightning: str | None = None, memory: int | None = None) -> threading.Thread | None:
    """Start reading `model_path`'s weights (and the `lightning` file) in a daemon thread; None
    when there is nothing to read or not enough memory to keep it."""
    if model_path is None:
        return None
    files = weight_files(model_path, lightning)
    size = sum(file.stat().st_size for file in files)
    memory = available_memory() if memory is None else memory
    if not files or size * HEADROOM > memory:
        if files:
            log.info("weights not prefetched: %.1f GB would not stay cached in %.1f GB of free memory", size / 1e9, memory / 1e9)
        return None

    def run():
        began = time.perf_counter()
        try:
            total = read_all(files, bulk_after=_imports_done)
        except OSError as error:  # best effort: the loader reads them anyway
            log.info("weights prefetch stopped: %s", error)
            return
        seconds = time.perf_counter() - began
        log.info("weights prefetched into memory: %.1f GB in %.1f s (%.2f GB/s)", total / 1e9, seconds, total / 1e9 / seconds)

    thread = threading.Thread(target=run, name="weights-prefetch", daemon=True)
    thread.start()
    return thread
