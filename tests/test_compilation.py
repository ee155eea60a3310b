"""COMPILE_TRANSFORMER through the worker as users run it: compiled where a compiler
exists, and served eagerly, with one warning, where none does (as in an image without gcc)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from config import Settings
from tests.test_handler import SAMPLE, run_handler, worker_env

JOB = {"input": {"prompt": "make the sky blue", "image_base64": SAMPLE, "seed": 5, "num_inference_steps": 2,
                 "width": 64, "height": 64}}  # fmt: skip
FALLBACK = "torch.compile failed"


def run_job(env: dict[str, str], tmp_path, name: str) -> tuple[str, np.ndarray]:
    out = tmp_path / name
    done = run_handler(["--test_input", json.dumps(JOB)], {**env, "SAVE_OUTPUT_DIR": str(out)})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    return log, np.asarray(Image.open(out / "local_test-0.png")).astype(int)


@pytest.fixture(scope="module")
def eager_pixels(tiny_env, tmp_path_factory):
    env = worker_env(tiny_env, COMPILE_TRANSFORMER="false")
    return run_job(env, tmp_path_factory.mktemp("eager"), "eager")[1]


def test_without_a_compiler_the_worker_falls_back_to_eager_with_one_warning(tiny_env, tmp_path, eager_pixels):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    # No g++ on PATH (inductor's C++ kernels need it; on a GPU triton needs a C compiler the same way),
    # and an empty compile cache, so nothing compiled earlier can stand in for the compiler.
    env = worker_env(tiny_env, COMPILE_TRANSFORMER="true", PATH=str(empty_bin),
                     TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # fmt: skip
    env.pop("CXX", None)
    log, pixels = run_job(env, tmp_path, "hidden")
    warnings = [line for line in log.splitlines() if FALLBACK in line]
    assert len(warnings) == 1, log[-3000:]
    assert "compiler" in warnings[0] and "serving with the eager transformer" in warnings[0]
    assert "retiring" not in log and "Traceback" not in log
    assert np.abs(pixels - eager_pixels).max() == 0  # the eager transformer made it


def test_with_a_compiler_the_transformer_is_compiled_and_matches_eager(tiny_env, tmp_path, eager_pixels):
    env = worker_env(tiny_env, COMPILE_TRANSFORMER="true", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    log, pixels = run_job(env, tmp_path, "compiled")
    assert FALLBACK not in log
    assert "warm-up edit took" in log and any((tmp_path / "inductor").iterdir())
    assert np.abs(pixels - eager_pixels).max() <= 1  # float32 kernels fused differently: at most 1/255


def test_compile_transformer_is_auto_by_default_and_takes_booleans(tiny_env):
    assert Settings.from_env(tiny_env()).compile_transformer is None
    assert Settings.from_env(tiny_env(COMPILE_TRANSFORMER="auto")).compile_transformer is None
    assert Settings.from_env(tiny_env(COMPILE_TRANSFORMER="yes")).compile_transformer is True
    assert Settings.from_env(tiny_env(COMPILE_TRANSFORMER="0")).compile_transformer is False
