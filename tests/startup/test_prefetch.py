"""The weights are read into memory while the worker imports, only when they are on disk and fit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from config import Settings
from qwen_edit_worker.startup import prefetch
from qwen_edit_worker.startup.model_files import local_model_path
from qwen_edit_worker.testing.tiny_model import ensure_tiny_model


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


def test_the_reads_run_in_a_process_of_their_own(tiny_settings, monkeypatch, caplog):
    """A thread's every read waits for the importing interpreter's lock: the reads must not run
    in the worker's process (on an H200 a thread read 47 GB 10 s later than the paced process,
    and the imports ended 9 s later beside it)."""
    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    size = sum(file.stat().st_size for file in prefetch.weight_files(path))

    def not_here(*args, **kwargs):
        raise AssertionError("the weights were read in the worker's own process")

    monkeypatch.setattr(prefetch, "read_all", not_here)
    monkeypatch.setattr(prefetch, "read_paced", not_here)
    with caplog.at_level(logging.INFO, logger="qwen_edit_worker.prefetch"):
        prefetch.start(path, memory=size * 2).join(timeout=60)
    assert f"weights prefetched into memory: {size / 1e9:.1f} GB" in caplog.text
    prefetch.imports_done()  # the reader has ended: telling it is harmless


def test_a_reader_that_cannot_start_leaves_the_worker_starting(tiny_settings, monkeypatch, caplog):
    """The prefetch is best effort: the loader reads the weights anyway."""
    import sys

    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    monkeypatch.setattr(sys, "executable", str(tiny_settings.model_dir) + "/no-python-here")
    with caplog.at_level(logging.INFO, logger="qwen_edit_worker.prefetch"):
        assert prefetch.start(path, memory=1 << 50) is None
    assert "weights not prefetched: the reader could not start" in caplog.text


def test_while_the_worker_imports_the_reader_pauses_as_long_as_each_read_took_and_no_longer_after(tmp_path):
    """Paced at 50%, the imports' small reads get the disk half of the time; once told the
    imports are done, the reader reads on without pauses."""
    import threading

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(bytes(prefetch.CHUNK * 3))
    ticks = iter(range(0, 1000, 10))  # every read "takes" 10 s: a pause of 10 s after it

    control, worker = os.pipe()
    result = []
    reader = threading.Thread(target=lambda: result.append(prefetch.read_paced([weights], control, 0.5, lambda: next(ticks))))
    reader.start()
    reader.join(timeout=1.0)
    assert reader.is_alive()  # pausing after its first read
    os.write(worker, prefetch.GO)
    reader.join(timeout=5.0)  # paced, the two reads left would take 20 s more
    assert not reader.is_alive() and result == [weights.stat().st_size]
    os.close(worker)
    os.close(control)


def test_the_reader_stops_once_the_worker_is_gone(tmp_path):
    """A worker that exits or dies mid-read (its end of the pipe closes) leaves no process
    reading behind it; while it lives, every byte is read."""
    import subprocess
    import sys

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(bytes(prefetch.CHUNK * 3))
    command = [sys.executable, "-I", "-S", prefetch.__file__, str(prefetch.DUTY), "", str(weights)]
    alive = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    alive.stdin.write(prefetch.GO)
    alive.stdin.flush()
    assert alive.stdout.read().strip() == f"total {prefetch.CHUNK * 3}".encode()
    alive.stdin.close()
    assert alive.wait(timeout=60) == 0
    gone = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)  # a closed pipe
    assert gone.returncode == 0 and gone.stdout.strip() == f"total {prefetch.CHUNK}".encode()  # one read, then it stopped


def test_the_import_set_is_read_first_and_then_the_weights_without_pauses(tiny_settings, tmp_path, monkeypatch, caplog):
    """With the image's list of the start-up's files, the reader reads those (a missing one
    skipped) and then the weights, without waiting for the imports to end."""
    import subprocess
    import sys

    listed = [tmp_path / "libfirst.so", tmp_path / "module.cpython-311.pyc"]
    listed[0].write_bytes(bytes(3 << 20))
    listed[1].write_bytes(bytes(12345))
    manifest = tmp_path / "import_set.txt"
    manifest.write_text("".join(f"{file}\n" for file in [listed[0], tmp_path / "gone.so", listed[1]]))
    assert prefetch.listed_files(manifest) == [str(file) for file in listed]
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(bytes(prefetch.CHUNK * 3))
    # Never told that the imports are done: paced reads would wait out a pause after each.
    command = [sys.executable, "-I", "-S", prefetch.__file__, "1.0", str(manifest), str(weights)]
    reader = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # its worker alive, never saying GO
    assert reader.stdout.read().decode().split("\n")[:2] == [f"first {(3 << 20) + 12345}", f"total {prefetch.CHUNK * 3}"]
    reader.stdin.close()
    assert reader.wait(timeout=60) == 0

    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    size = sum(file.stat().st_size for file in prefetch.weight_files(path))
    started, popen = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda command, **kwargs: started.append(command) or popen(command, **kwargs))
    with caplog.at_level(logging.INFO, logger="qwen_edit_worker.prefetch"):
        thread = prefetch.start(path, memory=(size + (3 << 20)) * 2, manifest=manifest)  # imports_done never called
        thread.join(timeout=60)
        prefetch.start(path, memory=size * 2, manifest=tmp_path / "absent.txt").join(timeout=60)  # outside the image
    assert [command[4:6] for command in started] == [["1.0", str(manifest)], [str(prefetch.DUTY), ""]]
    assert "the start-up's 2 files (import_set.txt) first, then the weights without pauses" in caplog.text
    assert "import set read into memory: 0.00 GB" in caplog.text
    assert f"weights prefetched into memory: {size / 1e9:.1f} GB" in caplog.text
    # The list's files count against the memory that must keep everything cached.
    assert prefetch.start(path, memory=int(size * prefetch.HEADROOM) + 1, manifest=tmp_path / "absent.txt") is not None
    assert prefetch.start(path, memory=int(size * prefetch.HEADROOM) + 1, manifest=manifest) is None


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
from qwen_edit_worker.startup import prefetch

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


MOUNTINFO = """\
25 1 0:30 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
26 25 0:31 / /proc rw,nosuid - proc proc rw
31 25 0:44 / /runpod-volume rw,relatime shared:9 - fuse.mfs mfs#10.0.0.5:9421 rw,user_id=0
32 25 259:1 /models /model\\040cache rw,relatime - ext4 /dev/nvme0n1p1 rw
"""


def test_the_file_system_of_a_path_is_its_innermost_mount():
    assert prefetch.file_system(Path("/runpod-volume/hub/x.safetensors"), MOUNTINFO) == "fuse.mfs"
    assert prefetch.file_system(Path("/runpod-volume-2/x"), MOUNTINFO) == "overlay"  # a prefix of a name is not a parent
    assert prefetch.file_system(Path("/model cache/x"), MOUNTINFO) == "ext4"  # mountinfo writes a space as \040
    assert prefetch.file_system(Path("/app/handler.py"), MOUNTINFO) == "overlay"
    assert prefetch.file_system(Path("/x"), "not mountinfo") == ""


def test_the_reader_pauses_unless_the_weights_are_on_a_network_file_system_the_libraries_are_not_on(tmp_path):
    """A network volume does not queue on the disk the imports read: pauses would only slow the
    read there. Where the weights share the libraries' file system, or another local one (which
    may sit on the same disk), the reader is paced."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    mounted = MOUNTINFO.replace("/runpod-volume", str(tmp_path))  # the weights' folder as a network volume
    assert prefetch.duty_for(weights, "/proc", mounted) == 1.0  # another file system than /proc's
    assert prefetch.duty_for(weights, str(tmp_path), mounted) == prefetch.DUTY  # the libraries beside them
    assert prefetch.duty_for(weights, "/proc", MOUNTINFO.replace("/model\\040cache", str(tmp_path))) == prefetch.DUTY  # ext4
