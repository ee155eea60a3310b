"""Where the model's and the Lightning LoRA's files are: MODEL_DIR, RunPod's model cache, the
image's baked cache, the standard Hugging Face cache, or a download (huggingface_hub).

No torch here: `handler.py` asks where the weights are before it imports anything heavy, so
that reading them (`prefetch`) overlaps the imports.
"""

from __future__ import annotations

import logging
from pathlib import Path

from config import Settings
from qwen_edit_worker.startup.startup_clock import timed

log = logging.getLogger("qwen_edit_worker.model")


def find_in_caches(fetch, cache_dirs: list[str | None], what: str) -> str | None:
    """Look in each cache without the network (None: the standard Hugging Face cache)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    for cache_dir in cache_dirs:
        try:
            path = fetch(cache_dir=cache_dir, local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            continue
        log.info("%s found in cache %s", what, cache_dir or "(default Hugging Face cache)")
        return path
    return None


def from_caches(fetch, cache_dirs: list[str | None], what: str) -> str:
    """Look in each cache without the network; download into the first one if none has it."""
    found = find_in_caches(fetch, cache_dirs, what)
    if found is not None:
        return found
    with timed(log, f"downloading {what} into {cache_dirs[0]}"):
        return fetch(cache_dir=cache_dirs[0], local_files_only=False)


def _cache_dirs(settings: Settings) -> list[str | None]:
    # MODEL_DIR first (it is also where downloads go), then RunPod's model cache, then the
    # standard Hugging Face cache (None lets huggingface_hub resolve HF_HOME/HF_HUB_CACHE).
    return [settings.model_dir, *settings.hf_cache_dirs, None]


def resolve_model_path(settings: Settings) -> str:
    if settings.is_tiny:
        from qwen_edit_worker.testing.tiny_model import ensure_tiny_model

        with timed(log, "building the tiny random model"):
            return str(ensure_tiny_model(settings.model_dir) / "pipeline")
    return _saved_pipeline(settings) or from_caches(_model_snapshot(settings), _cache_dirs(settings), settings.model_id)


def local_model_path(settings: Settings) -> str | None:
    """The model's directory if it is on disk already (nothing is downloaded); None otherwise."""
    if settings.is_tiny:
        return None
    return _saved_pipeline(settings) or find_in_caches(_model_snapshot(settings), _cache_dirs(settings), settings.model_id)


def local_lora_path(settings: Settings) -> str | None:
    """The Lightning file if the worker uses one and it is on disk already; None otherwise."""
    if settings.is_tiny or not settings.use_lightning_lora:
        return None
    return find_in_caches(_lightning_file(settings), _cache_dirs(settings), _lightning_name(settings))


def _saved_pipeline(settings: Settings) -> str | None:
    """MODEL_ID itself, when it names a directory holding a pipeline saved by diffusers."""
    return settings.model_id if Path(settings.model_id, "model_index.json").is_file() else None


def _model_snapshot(settings: Settings):
    from huggingface_hub import snapshot_download

    def fetch(**kwargs):
        return snapshot_download(settings.model_id, **kwargs)

    return fetch


def resolve_lora_path(settings: Settings) -> str:
    if settings.is_tiny:
        from qwen_edit_worker.testing.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(settings.model_dir) / "lightning-lora.safetensors")
    return from_caches(_lightning_file(settings), _cache_dirs(settings), _lightning_name(settings))


def _lightning_file(settings: Settings):
    from huggingface_hub import hf_hub_download

    def fetch(**kwargs):
        return hf_hub_download(settings.lightning_repo, settings.lightning_weight_name, **kwargs)

    return fetch


def _lightning_name(settings: Settings) -> str:
    return f"{settings.lightning_repo}/{settings.lightning_weight_name}"
