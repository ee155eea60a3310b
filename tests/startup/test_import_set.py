"""The image's list of the files a start-up reads (`qwen_edit_worker.startup.import_set`, run by the Dockerfile)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qwen_edit_worker.startup import import_set, prefetch

ROOT = Path(__file__).resolve().parents[2]


def test_the_build_step_lists_every_start_up_module_and_the_shared_libraries(tmp_path):
    manifest = tmp_path / "import_set.txt"
    done = subprocess.run([sys.executable, "-m", "qwen_edit_worker.startup.import_set", str(manifest)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("import set: ") and "not importable here" not in done.stdout  # every module imports
    listed = manifest.read_text().splitlines()
    assert listed == prefetch.listed_files(manifest) and len(listed) == len(set(listed))  # existing files, once each
    names = {Path(file).name for file in listed}
    import torch

    torch_libraries = Path(torch.__file__).parent / "lib"
    assert "libtorch_cpu.so" in names and any(file.startswith(str(torch_libraries)) for file in listed)  # mapped
    assert {"handler", "service", "model_loader", "edit_engine"} <= {name.split(".")[0] for name in names}  # source or bytecode
    assert any("pipeline_qwenimage_edit_plus" in name for name in names)  # loaded lazily by model_loader
    assert any("compile_fx" in name for name in names)  # torch.compile's, imported at the first compile


def test_a_module_that_cannot_be_imported_is_left_out_and_named(tmp_path):
    count, size, missing = import_set.record(tmp_path / "list.txt", ("json", "no_such_module_anywhere"))
    assert missing == ["no_such_module_anywhere"]
    listed = (tmp_path / "list.txt").read_text().splitlines()
    assert count == len(listed) and size == sum(os.path.getsize(file) for file in listed)
    assert import_set.module_files({"json": sys.modules["json"]})[0] in listed  # its bytecode, or its source


def test_mapped_files_are_the_paths_of_the_maps_lines():
    maps = (
        "7f00-7f10 r-xp 00000000 08:01 123 /usr/lib/libz.so.1\n"
        "7f10-7f20 rw-p 00000000 00:00 0 \n"
        "7f20-7f30 r--p 00000000 00:00 0 [vdso]\n"
        "7f30-7f40 r--s 00000000 00:05 9 /dev/nvidia0\n"
        "7f40-7f50 r--p 00000000 08:01 124 /opt/my libs/libx.so\n"
    )
    assert import_set.mapped_files(maps) == ["/usr/lib/libz.so.1", "/opt/my libs/libx.so"]
