"""The files a worker's start-up reads besides its weights, listed when the image is built.

A cold worker imports about 4,600 Python modules and maps about 4 GB of shared libraries
(torch's, the CUDA wheels', triton's), from the same disk as its weights. Read among the
weights, each of those small reads queues behind the weights' large ones: the imports took
30-36 s instead of 24 s alone, and the prefetch had to pause half of the time for them.
`python -m qwen_edit_worker.startup.import_set` (a step of the Dockerfile) imports what a start-up imports and
writes the files it read into `prefetch.IMPORT_SET`, beside the code. The prefetch reads
those files first, many at a time, and the weights after them without pauses: the imports
then find their files in memory (`prefetch`). On an H200 machine: 5,358 files,
3.95 GB, read in 4-5 s; the weights were in memory 10-16 s sooner. The imports themselves
did not get faster: once their files are in memory they are bound by the CPU.

Libraries that are only opened on a GPU (cuDNN, NVRTC, the driver) are not in the list: the
image is built without one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from qwen_edit_worker.startup.prefetch import IMPORT_SET

# What a worker imports up to its first result: handler's imports, then the modules that
# model_loader, adapters and compilation import when they are first used.
STARTUP_MODULES = (
    "handler",
    "qwen_edit_worker.service",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus",
    "diffusers.loaders.lora_pipeline",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "peft",
    "fa3_fwd_interface",  # FlashAttention-3, imported when the model is shaped (Hopper GPUs)
    "safetensors.torch",
    "torch._inductor.compile_fx",
    "torch._inductor.codegen.triton",
    "torch._inductor.runtime.triton_heuristics",
)


def module_files(modules: dict | None = None) -> list[str]:
    """The file each loaded module was read from: its cached bytecode where Python keeps one
    (Python reads that, not the source), else the source or the extension module."""
    files = []
    for module in list((modules if modules is not None else sys.modules).values()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            continue
        if path.endswith(".py"):
            cached = importlib.util.cache_from_source(path)
            path = cached if os.path.exists(cached) else path
        files.append(path)
    return files


def mapped_files(maps: str | None = None) -> list[str]:
    """The files mapped into this process (shared libraries), from /proc/self/maps or `maps`."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    paths = (line.split(None, 5)[5] for line in maps.splitlines() if len(line.split(None, 5)) == 6)
    return [path for path in paths if path.startswith("/") and not path.startswith(("/dev/", "/proc/", "/sys/"))]


def files_read() -> list[str]:
    """Every file this process has mapped or imported a module from, once each: the shared
    libraries first (the imports' first need), then the modules' files."""
    return list(dict.fromkeys(f for f in [*mapped_files(), *module_files()] if os.path.isfile(f)))


def record(path: Path = IMPORT_SET, modules: tuple[str, ...] = STARTUP_MODULES) -> tuple[int, int, list[str]]:
    """Import `modules` and write every file read for them (`files_read`) into `path`, one per
    line; the count, their bytes, and the modules that could not be imported (left out, as the
    worker would fail on them anyway)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this machine cannot import is only left out of the list
            missing.append(name)
    files = files_read()
    Path(path).write_text("".join(f"{file}\n" for file in files))
    return len(files), sum(os.path.getsize(file) for file in files), missing


if __name__ == "__main__":  # python -m qwen_edit_worker.startup.import_set [PATH]: list the start-up's files
    count, size, left_out = record(Path(sys.argv[1]) if len(sys.argv) > 1 else IMPORT_SET)
    print(f"import set: {count} files, {size / 1e9:.2f} GB" + (f"; not importable here: {', '.join(left_out)}" if left_out else ""))
