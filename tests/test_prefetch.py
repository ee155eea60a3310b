"""The weights are read into memory while the worker imports, only when they are on disk and fit."""

from __future__ import annotations

import logging

import prefetch
from config import Settings
from model_loader import local_model_path
from tiny_model import ensure_tiny_model


def test_the_saved_weights_are_read_in_the_background_when_memory_can_keep_them(tiny_settings, caplog):
    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    files = prefetch.weight_files(path)
    size = sum(file.stat().st_size for file in files)
    assert {file.parent.name for file in files} == {"transformer", "text_encoder", "vae"}
    with caplog.at_level(logging.INFO, logger="qwen_edit_worker.prefetch"):
        thread = prefetch.start(path, memory=size * 2)
        thread.join(timeout=60)
    assert f"weights prefetched into memory: {size / 1e9:.1f} GB" in caplog.text
    assert prefetch.read_all(files) == size


def test_nothing_is_read_without_the_memory_to_keep_it_or_a_model_on_disk(tiny_settings, tmp_path):
    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    size = sum(file.stat().st_size for file in prefetch.weight_files(path))
    assert prefetch.start(path, memory=size) is None  # would not stay cached
    assert prefetch.start(None) is None
    # A repo that is not on disk yet: no path, so nothing to prefetch (and nothing downloaded).
    assert local_model_path(Settings.from_env({"MODEL_ID": "acme/absent", "MODEL_DIR": str(tmp_path)})) is None
    assert local_model_path(Settings.from_env({"MODEL_ID": path})) == path
