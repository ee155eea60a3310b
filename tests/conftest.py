"""Shared fixtures: one tiny random pipeline per test session, built offline."""

from __future__ import annotations

import os

# Every graph the worker compiles is traced by dynamo and AOTAutograd as in production, then
# run by AOTAutograd's eager backend: inductor's C++ code generation (about 1.3 s of g++ per
# kernel, some 30 kernels per graph on this model) is left to the tests whose subject it is,
# which ask for the `inductor` fixture. `TORCH_COMPILE_OVERRIDE_BACKENDS= make test` (empty)
# compiles every graph with inductor.
os.environ.setdefault("TORCH_COMPILE_OVERRIDE_BACKENDS", ">=0:aot_eager")  # before torch reads its config
# Where a test does compile with inductor, its C++ kernels are scalar: choosing and writing the
# SIMD variants took half of a cold CPU compile (25 s -> 13 s for the tiny model's block), and a
# worker's kernels are Triton's, on a GPU, either way. The processes the tests start inherit it.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
# pytest-xdist runs one test per core (pytest.ini), and most tests start worker or rank
# processes of their own: a second torch thread per process only contends for the same cores
# (on 2 cores: 12% slower). Set before torch starts its thread pool; the processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
import torch._inductor.config
from PIL import Image

from config import Settings
from model_loader import ModelHolder
from qwen_edit_worker.engine.edit_engine import EditEngine

# Were torch imported first (a pytest plugin does), it read neither variable: set them here too.
torch._dynamo.config.debug_backend_override = os.environ["TORCH_COMPILE_OVERRIDE_BACKENDS"]
torch._inductor.config.cpp.vec_isa_ok = torch._inductor.config.get_tristate_env("TORCHINDUCTOR_VEC_ISA_OK")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_env(model_dir):
    """The environment of a tiny-random worker; tests add or override variables."""

    def make(**overrides: str) -> dict[str, str]:
        env = {"MODEL_ID": "tiny-random", "MODEL_DIR": model_dir, "USE_LIGHTNING_LORA": "false"}
        env.update(overrides)
        return env

    return make


@pytest.fixture(scope="session")
def tiny_settings(tiny_env) -> Settings:
    return Settings.from_env(tiny_env())


@pytest.fixture(scope="session")
def base_holder(tiny_settings) -> ModelHolder:
    holder = ModelHolder(tiny_settings)
    holder.get()
    return holder


@pytest.fixture(scope="session")
def engine(tiny_settings, base_holder) -> EditEngine:
    return EditEngine(tiny_settings, base_holder.get)


@pytest.fixture(autouse=True)
def compile_stance():
    """A service with several replicas freezes compilation for the whole process
    (`eager_on_recompile`, as a worker should): undo it for the tests that follow, wherever
    such a service ran (the fence test of `test_side_stream` counted no compile after one)."""
    yield
    torch.compiler.set_stance("default")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def wait_for_idle_warm_ups(service, timeout_s: float = 120) -> None:
    """Until the service's idle warm-ups (LoRA slots, batch sizes) have compiled, or `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while service.engine.warming_up and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture
def inductor(monkeypatch):
    """Graphs compiled by the backend asked for (the worker's: inductor), in this process and
    in the processes it starts: for the tests of inductor's code, cache and compiler."""
    monkeypatch.setenv("TORCH_COMPILE_OVERRIDE_BACKENDS", "")
    with torch._dynamo.config.patch(debug_backend_override=""):
        yield


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory) -> str:
    """One torch.compile cache for the tests whose subject is not the cache itself: the tiny
    model's graphs compile once per session (C++ kernels take most of a CPU compile), and a
    hit changes how long a compile takes, never what dynamo counts or what the model gives."""
    return str(tmp_path_factory.mktemp("inductor"))
