"""torch.compile's cache across workers: restored from the network volume before compiling,
saved back after the start-up warm-up.

Where the weights sit on a network volume (`Settings.compile_cache_mirror`), inductor writes its
cache on the container's own disk and RunPod's `VolumeCache` mirrors it on the volume: it
packs the thousands of small files into one archive, so that a new worker reads one file
instead of opening each over the network. A worker whose weights are on its own disk keeps
the cache beside them, which needs no mirror. Both directions are best effort: a failure
costs a compile, never the worker.
"""

from __future__ import annotations

import logging
import threading
import time

from config import Settings, export_library_settings, inductor_cache_dir

log = logging.getLogger("qwen_edit_worker.compile_cache")

NAMESPACE = "qwen-edit-worker-compile"  # the mirror: MODEL_DIR/.cache/<NAMESPACE>


def _mirror(settings: Settings):
    if not settings.compile_cache_mirror:
        return None
    from runpod.serverless.utils import VolumeCache

    export_library_settings(settings)  # the directory inductor will use (a user's choice kept)
    return VolumeCache(dirs=[inductor_cache_dir()], namespace=NAMESPACE, volume_path=settings.compile_cache_mirror)


def restore(settings: Settings) -> threading.Thread | None:
    """Start copying the mirrored cache onto the container's disk (while the weights load);
    join the thread before compiling."""
    mirror = _mirror(settings)
    if mirror is None or not mirror.available:
        return None

    def hydrate():
        start = time.perf_counter()
        copied = mirror.hydrate()
        log.info("compile cache: %s files restored from %s in %.1f s", copied, settings.compile_cache_mirror,
                 time.perf_counter() - start)  # fmt: skip

    thread = threading.Thread(target=hydrate, name="compile-cache-restore", daemon=True)
    thread.start()
    return thread


_saving = threading.Lock()  # one save at a time: two would pack the same archive at once
_saves: list[threading.Thread] = []


def keep(settings: Settings) -> None:
    """Mirror what is compiled so far onto the volume, in the background (after the warm-up,
    and again once the LoRA slots' graphs are compiled)."""
    mirror = _mirror(settings)
    if mirror is None or not mirror.available:
        return

    def save():
        with _saving:
            mirror.sync(background=False)

    thread = threading.Thread(target=save, name="compile-cache-save", daemon=True)
    thread.start()
    _saves.append(thread)
    log.info("compile cache: saving to %s in the background", settings.compile_cache_mirror)


def wait_for_saves(timeout_s: float = 60.0) -> None:
    """Let the saves started so far finish (a process about to exit)."""
    for thread in list(_saves):
        thread.join(timeout_s)
