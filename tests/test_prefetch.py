"""The weights are read into memory while the worker imports, only when they are on disk and fit."""

from __future__ import annotations

import logging

import prefetch
from config import Settings
from model_files import local_model_path
from tiny_model import ensure_tiny_model


def test_the_saved_weights_are_read_in_the_background_when_memory_can_keep_them(tiny_settings, caplog):
    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    files = prefetch.weight_files(path)
    size = sum(file.stat().st_size for file in files)
    assert {file.parent.name for file in files} == {"transformer", "text_encoder", "vae"}
    with caplog.at_level(logging.INFO, logger="qwen_edit_worker.prefetch"):
        thread = prefetch.start(path, memory=size * 2)
        assert thread is not None
        thread.join(timeout=60)
    assert f"weights prefetched into memory: {size / 1e9:.1f} GB" in caplog.text
    assert prefetch.read_all(files) == size


def test_reads_are_small_while_the_process_imports_and_large_afterwards(tmp_path, monkeypatch):
    """Small reads give the imports their turn at the disk; once they are done, large reads
    take it (the rest of the weights is then what the start waits for)."""
    import threading

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(bytes(prefetch.CHUNK * 3 + prefetch.BULK_CHUNK * 2))
    imported, sizes = threading.Event(), []

    class Watched:  # the file as `read_all` opens it, each read's size recorded
        def __init__(self, *args, **kwargs):
            self.stream = open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def readinto(self, buffer):
            sizes.append(len(buffer))
            if len(sizes) == 3:
                imported.set()  # the imports end after the third read
            return self.stream.readinto(buffer)

    monkeypatch.setattr(prefetch, "open", Watched, raising=False)
    assert prefetch.read_all([weights], bulk_after=imported) == weights.stat().st_size
    assert sizes[:3] == [prefetch.CHUNK] * 3 and set(sizes[3:]) == {prefetch.BULK_CHUNK}
    assert prefetch.BULK_CHUNK >= 64 * prefetch.CHUNK


def test_nothing_is_read_without_the_memory_to_keep_it_or_a_model_on_disk(tiny_settings, tmp_path):
    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    size = sum(file.stat().st_size for file in prefetch.weight_files(path))
    assert prefetch.start(path, memory=size) is None  # would not stay cached
    lightning = ensure_tiny_model(tiny_settings.model_dir) / "lightning-lora.safetensors"
    with_lightning = (size + lightning.stat().st_size) * prefetch.HEADROOM
    assert prefetch.start(path, memory=int(with_lightning)) is not None
    assert prefetch.start(path, str(lightning), memory=int(with_lightning) - 1) is None  # the Lightning file counts
    assert prefetch.start(None) is None
    # A repo that is not on disk yet: no path, so nothing to prefetch (and nothing downloaded).
    assert local_model_path(Settings.from_env({"MODEL_ID": "acme/absent", "MODEL_DIR": str(tmp_path)})) is None
    assert local_model_path(Settings.from_env({"MODEL_ID": path})) == path


def test_files_are_read_in_the_order_the_loader_needs_them(tmp_path):
    """The transformer, the VAE and Lightning are compiled while the text encoder is still read."""
    model = tmp_path / "model"
    for part in ("text_encoder/model-00001-of-00002", "text_encoder/model-00002-of-00002", "transformer/a",
                 "transformer/b", "vae/diffusion_pytorch_model", "scheduler/odd"):  # fmt: skip
        (model / part).parent.mkdir(parents=True, exist_ok=True)
        (model / part).with_suffix(".safetensors").write_bytes(b"x")
    lightning = tmp_path / "hub" / "lightning.safetensors"
    lightning.parent.mkdir()
    lightning.write_bytes(b"y")
    order = [f"{file.parent.name}/{file.stem}" for file in prefetch.weight_files(str(model), str(lightning))]
    assert order == ["transformer/a", "transformer/b", "vae/diffusion_pytorch_model", "hub/lightning",
                     "text_encoder/model-00001-of-00002", "text_encoder/model-00002-of-00002", "scheduler/odd"]  # fmt: skip



SPY_ON_THE_PREFETCH = """
import runpy, sys
import prefetch

def spy(model_path, lightning=None, memory=None):
    print("PREFETCH", model_path, "torch imported" if "torch" in sys.modules else "before torch", flush=True)
    sys.exit(0)

prefetch.start = spy
sys.argv = ["handler.py"]
runpy.run_path("handler.py", run_name="__main__")
"""


def test_the_worker_starts_reading_the_weights_before_it_imports_torch(tiny_env, tiny_settings):
    """The imports (20-40 s on a cold disk) and the read overlap only if the read starts first."""
    import subprocess
    import sys

    from tests.test_handler import ROOT, worker_env

    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")  # a saved pipeline: on disk
    done = subprocess.run([sys.executable, "-c", SPY_ON_THE_PREFETCH], cwd=ROOT, env=worker_env(tiny_env, MODEL_ID=path),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert f"PREFETCH {path} before torch" in done.stdout, done.stdout + done.stderr[-2000:]
