"""Read the libraries' and the model's files into the page cache while the worker is still importing.

A cold worker spends its first 20 s or so importing torch, transformers and diffusers before
it can read a single weight, and then reads ~58 GB. Reading the files from a background
thread from the process's first moment (`handler.py` starts it before importing torch)
overlaps the two: by the time `from_pretrained` asks for the weights, much of them is in
memory. The files are read in the order the loader needs them (`model_loader`: the
transformer, the VAE and the Lightning LoRA, which are compiled while the text encoder is
still being read). Only files already on disk are read (nothing is downloaded here), and only
when the machine has the memory to keep them cached; otherwise the reads would evict each
other and cost disk bandwidth for nothing.

The imported libraries' own files (torch's and CUDA's shared libraries, thousands of small
Python files) are read first, by several threads: behind 58 GB of weights on the same disk,
the imports took 43 s instead of the 15-20 s they need with their files in memory (an H200's
local disk), and the loading waited for them.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("qwen_edit_worker.prefetch")

CHUNK = 16 << 20
HEADROOM = 1.2  # the files must fit in available memory this many times over


LOAD_ORDER = ("transformer", "vae", "lightning", "text_encoder")
# What the worker imports, heaviest first; a precision mode adds its quantization library.
LIBRARIES = ("torch", "nvidia", "triton", "transformers", "diffusers", "torchvision", "tokenizers", "safetensors", "peft",
             "accelerate", "huggingface_hub", "runpod", "aiohttp", "PIL", "numpy", "pydantic", "pydantic_core")  # fmt: skip
QUANTIZATION_LIBRARIES = {"fp8": ("torchao",), "4bit": ("bitsandbytes",), "8bit": ("bitsandbytes",)}
LIBRARY_READERS = 8  # small files: the disk's latency, not its bandwidth, limits one reader


def libraries(precision_mode: str) -> tuple[str, ...]:
    return LIBRARIES + QUANTIZATION_LIBRARIES.get(precision_mode, ())


def library_files(packages: tuple[str, ...]) -> list[Path]:
    """The Python and shared-library files of `packages` (found, not imported), in that order."""
    files = []
    for package in packages:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or ()) if spec is not None else ():
            files += [path for path in sorted(Path(location).rglob("*"))
                      if (path.suffix in (".py", ".pyc") or ".so" in path.suffixes) and path.is_file()]  # fmt: skip
    return files


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


def read_all(files: list[Path], readers: int = 1) -> int:
    """Read every byte of `files` once, by `readers` threads; the bytes read."""
    if readers > 1:
        with ThreadPoolExecutor(readers, thread_name_prefix="prefetch") as pool:
            return sum(pool.map(lambda file: read_all([file]), files))
    buffer = bytearray(CHUNK)
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as stream:
            while count := stream.readinto(buffer):
                total += count
    return total


def start(model_path: str | None, lightning: str | None = None, packages: tuple[str, ...] = (),
          memory: int | None = None) -> threading.Thread | None:  # fmt: skip
    """Start reading the files of `packages`, then `model_path`'s weights (and the `lightning`
    file), in a daemon thread; None when there are no weights to read or not enough memory to
    keep them."""
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
            code = library_files(packages)
            total = read_all(code, readers=LIBRARY_READERS)
            log.info("libraries read into memory: %.1f GB in %d files in %.1f s", total / 1e9, len(code), time.perf_counter() - began)
            began = time.perf_counter()
            total = read_all(files)
        except OSError as error:  # best effort: the loader reads them anyway
            log.info("weights prefetch stopped: %s", error)
            return
        seconds = time.perf_counter() - began
        log.info("weights prefetched into memory: %.1f GB in %.1f s (%.2f GB/s)", total / 1e9, seconds, total / 1e9 / seconds)

    thread = threading.Thread(target=run, name="weights-prefetch", daemon=True)
    thread.start()
    return thread
