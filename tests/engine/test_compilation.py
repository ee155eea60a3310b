"""COMPILE_TRANSFORMER through the worker as users run it: compiled where a compiler
exists, and served eagerly, with one warning, where none does (as in an image without gcc)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from config import Settings
from tests.conftest import wait_for_idle_warm_ups
from tests.test_handler import SAMPLE, decoded, run_handler, worker_env

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
def eager_pixels(tiny_env):
    """The eager worker's image of JOB, made in this process (the worker processes of the tests
    make theirs with the same code, kernels and thread count)."""
    import asyncio

    from qwen_edit_worker.service import EditService

    service = EditService(Settings.from_env(tiny_env(COMPILE_TRANSFORMER="false")))
    try:
        answer = asyncio.run(service.handle({"id": "eager", **JOB}))
    finally:
        service.close()
    return np.asarray(decoded(answer["output_image_base64"])).astype(int)


def test_without_a_compiler_the_worker_falls_back_to_eager_with_one_warning(inductor, tiny_env, tmp_path, eager_pixels):
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


def test_without_a_compiler_context_mode_ranks_fall_back_to_eager_together(inductor, tiny_env, tmp_path, eager_pixels):
    """Every rank's compile fails alike, while tracing, before any collective: the followers
    fall back to eager as rank 0 does and stay in step with its repeated warm-up. (They used
    to stop instead, and rank 0 then waited for them in a collective: on NCCL, forever.)"""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = worker_env(tiny_env, COMPILE_TRANSFORMER="true", PATH=str(empty_bin), GPU_PARALLELISM="context", GPU_COUNT="2",
                     MAX_LORAS="0", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # fmt: skip
    env.pop("CXX", None)
    log, pixels = run_job(env, tmp_path, "context")
    warnings = [line for line in log.splitlines() if FALLBACK in line]
    assert len(warnings) == 2, log[-3000:]  # rank 0 and rank 1, once each
    assert "Traceback" not in log and "GPU processes" not in log, log[-6000:]
    assert np.abs(pixels - eager_pixels).max() <= 1  # split attention sums in another order


def test_compile_transformer_is_auto_by_default_and_takes_booleans(tiny_env):
    assert Settings.from_env(tiny_env()).compile_transformer is None
    assert Settings.from_env(tiny_env(COMPILE_TRANSFORMER="auto")).compile_transformer is None
    assert Settings.from_env(tiny_env(COMPILE_TRANSFORMER="yes")).compile_transformer is True
    assert Settings.from_env(tiny_env(COMPILE_TRANSFORMER="0")).compile_transformer is False


def test_weights_on_a_volume_put_the_compile_cache_on_local_disk_mirrored_there(tmp_path):
    import config

    (tmp_path / "local").mkdir()
    assert config._on_another_filesystem(str(tmp_path / "not-yet"), str(tmp_path / "local")) is False
    assert config._on_another_filesystem("/proc/self", str(tmp_path / "local")) is True  # another filesystem
    local = Settings.from_env({"MODEL_DIR": str(tmp_path / "models")})
    assert local.compile_cache_mirror is None
    assert config.compile_cache_dir(local) == str(tmp_path / "models" / "torchinductor")
    on_volume = dataclasses.replace(local, compile_cache_mirror=str(tmp_path / "models"))
    assert not config.compile_cache_dir(on_volume).startswith(str(tmp_path / "models"))


def serve_one_job_on_a_volume(settings: Settings, job_input: dict) -> dict:
    """One job served by a worker with `settings`, its compile cache saved to the volume: the
    image, the error, and the compile cache's hits and misses meanwhile. The compiled graphs
    are dropped afterwards, so that nothing later in the process reuses them."""
    import asyncio

    import torch
    from torch._dynamo.utils import counters

    from qwen_edit_worker.engine import compile_cache
    from qwen_edit_worker.service import EditService

    counts = {name: counters["inductor"][f"fxgraph_cache_{name}"] for name in ("hit", "miss")}
    service = EditService(settings)
    try:
        answer = asyncio.run(service.handle({"id": "j", "input": job_input}))
    finally:
        service.close()
        compile_cache.wait_for_saves()  # the background save
        torch._dynamo.reset()
    return {"image": answer.get("output_image_base64"), "error": answer.get("error"),
            "hits": counters["inductor"]["fxgraph_cache_hit"] - counts["hit"],
            "misses": counters["inductor"]["fxgraph_cache_miss"] - counts["miss"]}  # fmt: skip


# The same in a new process: a worker in a new container.
WORKER_ON_A_VOLUME = """
import dataclasses, json, logging, sys
logging.basicConfig(level=logging.INFO)  # the worker's log, as handler.py sets it up
from config import Settings
from tests.engine.test_compilation import serve_one_job_on_a_volume
settings = dataclasses.replace(Settings.from_env(), compile_cache_mirror=sys.argv[1])  # as if MODEL_DIR were on a volume
print("RESULT " + json.dumps(serve_one_job_on_a_volume(settings, json.loads(sys.argv[2]))))
"""


def test_a_compiled_worker_matches_eager_and_the_next_one_on_its_volume_starts_from_its_compile_cache(inductor, tiny_env, tmp_path,
                                                                                                   eager_pixels, monkeypatch,
                                                                                                   caplog):  # fmt: skip
    """With a compiler the transformer is compiled (inductor, from an empty cache), before the
    text encoder loads, and its pixels are eager's; its compile cache goes to the volume, and
    a worker in a new container (a new process, an empty disk) on the same volume compiles
    nothing."""
    import logging
    import shutil
    import subprocess
    import sys

    from tests.test_handler import ROOT

    volume = tmp_path / "volume"
    volume.mkdir()
    # No idle warm-ups (LoRA slots, batch sizes), whose progress by the time the worker closes
    # varies: both workers then compile the same graphs. Compiled once, on the transformer
    # itself (not first on a stand-in while it loads): half the C++ compiles.
    env = worker_env(tiny_env, COMPILE_TRANSFORMER="true", MAX_LORAS="0", MAX_BATCH_SIZE="1",
                     COMPILE_WHILE_LOADING="false")  # fmt: skip
    disk = tmp_path / "container-disk"  # the same path in every container, empty in a new one
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(disk))  # read where inductor writes
    settings = dataclasses.replace(Settings.from_env(env), compile_cache_mirror=str(volume))  # as if on a volume
    with caplog.at_level(logging.INFO):
        first = serve_one_job_on_a_volume(settings, JOB["input"])  # in this process, whose imports are done
    assert first["error"] is None and first["misses"] > 0  # the first compiled its graphs
    assert FALLBACK not in caplog.text and "warm-up edit took" in caplog.text and any(disk.iterdir())
    assert "compiling before the text encoder loads took" in caplog.text  # the service asks the loader to
    assert (volume / ".cache" / "qwen-edit-worker-compile" / "manifest.json").exists()  # saved there

    shutil.rmtree(disk)  # a new container
    env["TORCHINDUCTOR_CACHE_DIR"] = str(disk)
    done = subprocess.run([sys.executable, "-c", WORKER_ON_A_VOLUME, str(volume), json.dumps(JOB["input"])], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    second = json.loads(lines[0])
    assert second["error"] is None
    assert second["hits"] > 0 and second["misses"] == 0  # restored before compiling: found them all
    assert first["image"] == second["image"]
    compiled = np.asarray(decoded(first["image"])).astype(int)
    assert np.abs(compiled - eager_pixels).max() <= 1  # float32 kernels fused differently: at most 1/255


def test_after_the_idle_warm_ups_no_batch_size_output_size_or_reference_compiles_on_a_job(inductor_cache, tiny_env, tmp_path, monkeypatch):
    """Dynamo specialises the batch dimension until it has seen two sizes above 1: the idle
    warm-ups show it those, so the batcher's later batches of any size reuse their graphs.
    Outputs and references of any size the schema allows (sides that are odd multiples of 16
    too), and 1-3 references, reuse them as well: the image's length is symbolic, as the
    text's is."""
    from torch._dynamo.utils import counters

    from model_loader import ModelHolder
    from qwen_edit_worker.engine.compilation import warm_up
    from qwen_edit_worker.engine.edit_engine import EditEngine, EditRequest
    from tests.conftest import random_image

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    settings = Settings.from_env(tiny_env(COMPILE_TRANSFORMER="true", MAX_LORAS="0", MAX_BATCH_SIZE="4"))
    holder = ModelHolder(settings)
    engine = EditEngine(settings, holder.get)
    warm_up(holder.get(), engine.warm_up)
    engine.want_batch_graphs()  # as the batcher asks once a job could share a batch (`batch_limit`)
    assert engine.warming_up
    while engine.warm_up_idle():
        pass
    image = random_image(64, 64)
    prompts = ["a", "make it blue please", "make the sky a deep orange sunset with birds", "x y"]

    def edit(prompt: str, images: int = 1) -> EditRequest:
        return EditRequest(prompt=prompt, images=(image,), seed=1, num_inference_steps=1, true_cfg_scale=1.0,
                           num_images=images)  # fmt: skip

    graphs = counters["stats"]["unique_graphs"]
    engine.run_batch([edit(p) for p in prompts])  # 4 texts of unequal length: masked
    engine.run_batch([edit(p) for p in prompts[1:3]])
    engine.run_batch([edit(prompts[0], images=2)])  # one request, two images: no mask
    engine.run_batch([edit("a prompt of yet another length")])

    def sized(prompt: str, size: tuple[int, int], references: list[tuple[int, int]], images: int = 1) -> EditRequest:
        pictures = tuple(random_image(w, h, seed=n) for n, (w, h) in enumerate(references))
        return EditRequest(prompt=prompt, images=pictures, seed=1, num_inference_steps=1, true_cfg_scale=1.0,
                           width=size[0], height=size[1], num_images=images)  # fmt: skip

    engine.run_batch([sized("a", (80, 48), [(64, 64)])])
    engine.run_batch([sized("make it blue", (112, 64), [(50, 90), (64, 64)], images=2)])
    engine.run_batch([sized(p, (64, 96), [(96, 40), (64, 64), (30, 30)]) for p in ("x", "a longer prompt here", "yz")])
    engine.run_batch([sized("one more length of prompt", (144, 144), [(128, 100)], images=3)])
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_transformer_compiles_before_the_text_encoder_loads_and_the_warm_up_adds_no_graph(inductor_cache, tiny_env, tmp_path,
                                                                                               monkeypatch):  # fmt: skip
    """On a cold worker the compile overlaps with reading the text encoder's 16.6 GB: the loader
    compiles with random prompt embeddings first, and those graphs serve the real prompts."""
    import math

    import torch
    from torch._dynamo.utils import counters

    from model_loader import ModelHolder
    from qwen_edit_worker.engine.compilation import warm_up
    from qwen_edit_worker.engine.edit_engine import EditEngine

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    torch._dynamo.reset()  # no graph from earlier tests: the compile ahead must compile its own
    settings = Settings.from_env(tiny_env(COMPILE_TRANSFORMER="true", MAX_LORAS="1", USE_LIGHTNING_LORA="true"))
    seen = {}

    def compile_ahead(model):
        seen["text encoder"], seen["transformer"] = model.pipe.text_encoder, model.pipe.transformer
        engine.compile_ahead(model)
        seen["graphs"] = counters["stats"]["unique_graphs"]

    holder = ModelHolder(settings, compile_ahead=compile_ahead)
    engine = EditEngine(settings, holder.get)
    before = counters["stats"]["unique_graphs"]
    model = holder.get()
    assert seen["text encoder"] is None and model.pipe.text_encoder is not None  # loaded after the compile
    assert seen["transformer"] is model.pipe.transformer and model.compiled
    assert model.lora_slot_count == 1 and not model.lora_slots  # prepared after the start-up warm-up
    assert seen["graphs"] > before
    assert math.isclose(model.pipe.scheduler.config.base_shift, math.log(3))  # Lightning's scheduler carried over
    warm_up(model, engine.warm_up)
    assert counters["stats"]["unique_graphs"] == seen["graphs"]  # the real prompts' lengths reuse those graphs


def test_the_first_compile_serves_every_text_length(inductor_cache, tiny_env, tmp_path, monkeypatch):
    """Prompts have any length. The first warm-up compiles the graph that every length uses:
    a second length, and a third, compile nothing (left to dynamo, the first length got a
    graph of its own and the second compiled again)."""
    import torch
    from torch._dynamo.utils import counters

    from model_loader import ModelHolder
    from qwen_edit_worker.engine.edit_engine import EditEngine, _WarmUp

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    torch._dynamo.reset()
    settings = Settings.from_env(tiny_env(COMPILE_TRANSFORMER="true", MAX_LORAS="0", COMPILE_WHILE_LOADING="false"))
    holder = ModelHolder(settings)
    engine = EditEngine(settings, holder.get)
    model = holder.get()
    graphs = []
    for tokens in (200, 231, 57):
        before = counters["stats"]["unique_graphs"]
        engine._warm_up_edit(model, _WarmUp(text_tokens=tokens))
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 0, 0]


@pytest.mark.parametrize("slots", ["0", "1"])
def test_compiling_while_loading_leaves_the_real_transformer_no_graph_to_compile(inductor_cache, tiny_env, tmp_path, monkeypatch, slots):
    """COMPILE_WHILE_LOADING: the warm-ups run on a one-block stand-in while a thread reads the
    weights; the loaded transformer's blocks find those graphs. Without the stand-in (the
    control) the same warm-ups do compile, so the count can tell."""
    import threading

    import torch
    from torch._dynamo.utils import counters

    import model_loader
    from model_loader import ModelHolder
    from qwen_edit_worker.engine.compilation import warm_up
    from qwen_edit_worker.engine.edit_engine import EditEngine

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    compiled_on = {}

    def start(stand_in: bool):
        torch._dynamo.reset()  # no graph from earlier tests
        settings = Settings.from_env(tiny_env(COMPILE_TRANSFORMER="true", MAX_LORAS=slots, USE_LIGHTNING_LORA="true",
                                              COMPILE_WHILE_LOADING=str(stand_in).lower()))  # fmt: skip

        def compile_ahead(model):
            before = counters["stats"]["unique_graphs"]
            engine.compile_ahead(model)
            layers = model.pipe.transformer.config.num_layers
            compiled_on[layers] = compiled_on.get(layers, 0) + counters["stats"]["unique_graphs"] - before

        holder = ModelHolder(settings, compile_ahead=compile_ahead)
        engine = EditEngine(settings, holder.get)
        model = holder.get()
        warm_up(model, engine.warm_up)
        return model, engine

    real_load, threads = model_loader._load_onto, []

    def load_onto(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_loader, "_load_onto", load_onto)
    model, engine = start(stand_in=True)
    real_layers = model.pipe.transformer.config.num_layers
    assert real_layers > 1 and compiled_on[1] > 0  # the stand-in has one block, and compiled
    assert compiled_on[real_layers] == 0  # the real blocks found every graph
    assert threads[0].startswith("weights") and threads[1] == threading.current_thread().name  # the read ran beside it
    assert model.compiled and model.lora_slot_count == int(slots) and not model.lora_slots

    compiled_on.clear()
    start(stand_in=False)
    assert compiled_on[real_layers] > 0  # the control: the same warm-ups compile on the real blocks


START_WORKERS = """
import os, runpy, sys
from qwen_edit_worker.engine import compilation
from config import compile_cache_dir

def spy(settings):
    started(settings)
    from torch._inductor.async_compile import _pool_set
    exported = os.environ.get("TORCHINDUCTOR_CACHE_DIR") == compile_cache_dir(settings)
    print("WORKERS", len(_pool_set), "cache exported" if exported else "cache not exported",
          "after diffusers" if "diffusers" in sys.modules else "before diffusers", flush=True)
    os._exit(0)

started, compilation.start_workers = compilation.start_workers, spy
if os.environ.get("AS_IF_ON_A_GPU"):  # where the worker finds a GPU (it stops before using it)
    import torch
    torch.cuda.is_available = lambda: True
sys.argv = ["handler.py"]
runpy.run_path("handler.py", run_name="__main__")
"""


@pytest.mark.parametrize("setting, pools", [
    ({"AS_IF_ON_A_GPU": "1"}, True), ({"AS_IF_ON_A_GPU": "1", "COMPILE_TRANSFORMER": "false"}, False),
    ({"AS_IF_ON_A_GPU": "1", "COMPILE_TRANSFORMER": "true", "PRECISION_MODE": "4bit"}, False),
    ({"COMPILE_TRANSFORMER": "true"}, False), ({}, False)])  # fmt: skip
def test_the_compile_workers_start_while_the_worker_still_imports_if_it_will_compile(tiny_env, setting, pools):
    """torch starts its compile workers at the first compile, where they took the CPU from
    the Lightning load on a GPU machine; the worker starts them once torch is imported, before
    diffusers, and only where the transformer is compiled on a GPU (the pool compiles Triton
    kernels: a CPU's are compiled on threads, so there the pool would only take the CPU), never
    with bitsandbytes. They keep the environment they start with: the compile cache's."""
    import subprocess
    import sys

    from tests.test_handler import ROOT

    env = {**worker_env(tiny_env, **setting), "TORCHINDUCTOR_COMPILE_THREADS": "2"}  # a pool even on a 1-core machine
    done = subprocess.run([sys.executable, "-c", START_WORKERS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    expected = "WORKERS 1 cache exported before diffusers" if pools else "WORKERS 0 cache not exported before diffusers"
    assert expected in done.stdout, done.stdout + done.stderr[-2000:]



def test_a_queue_met_at_start_runs_on_compiled_graphs_only_and_batches_once_they_exist(inductor_cache, tiny_env, tmp_path, monkeypatch):
    """A RunPod worker starts because jobs are queued. Those jobs run alone, on the graph the
    start-up compiled (the batch graphs are compiled only when the GPU is first idle): none
    waits for a compile. Once the batch graphs exist, small jobs share batches."""
    import asyncio
    import time

    from torch._dynamo.utils import counters

    from qwen_edit_worker.engine.edit_engine import EditEngine
    from qwen_edit_worker.service import EditService
    from tests.test_handler import SAMPLE

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    settings = Settings.from_env(tiny_env(COMPILE_TRANSFORMER="true", MAX_LORAS="0", MAX_BATCH_SIZE="4", BATCH_WAIT_MS="200"))
    services, warm_up = [], EditEngine.warm_up

    def warm_up_once_jobs_wait(engine):  # the queue is there before the worker is ready
        deadline = time.monotonic() + 60
        while not (services and services[0].batcher.queued >= 6) and time.monotonic() < deadline:
            time.sleep(0.02)
        warm_up(engine)

    monkeypatch.setattr(EditEngine, "warm_up", warm_up_once_jobs_wait)
    service = EditService(settings)
    services.append(service)
    compiled_on_jobs = []
    lane = service.batcher.lanes[0]

    def counted(requests):
        before = counters["stats"]["unique_graphs"]
        try:
            return lane.run_batch(requests)
        finally:
            compiled_on_jobs.append(counters["stats"]["unique_graphs"] - before)

    service.batcher.lanes = (dataclasses.replace(lane, run_batch=counted),)

    def jobs(count: int, prompt: str) -> list[dict]:
        return [{"id": f"{prompt}-{k}", "input": {"prompt": f"{prompt} {'x ' * k}", "image_base64": SAMPLE, "seed": k,
                                                  "num_inference_steps": 1, "width": 64, "height": 64}}  # fmt: skip
                for k in range(count)]

    async def burst(batch: list[dict]) -> list[dict]:
        return await asyncio.gather(*(service.handle(j) for j in batch))

    try:
        queued = asyncio.run(burst(jobs(6, "queued")))
        assert [a["batch_size"] for a in queued] == [1] * 6, queued
        wait_for_idle_warm_ups(service, timeout_s=240)  # the batch graphs, while idle
        later = asyncio.run(burst(jobs(8, "later")))
    finally:
        service.close()
    assert all("output_image_base64" in a for a in later)
    assert max(a["batch_size"] for a in later) > 1
    assert set(compiled_on_jobs) == {0}


def test_batches_that_overlap_and_end_out_of_order_leave_compiling_on(inductor, tiny_env):
    """Two lanes' batches (replicas on threads) overlap and the first to start ends first:
    afterwards the idle warm-ups must still compile (the stance is one process global)."""
    import torch

    from qwen_edit_worker.engine import compilation

    model = type("Compiled", (), {"compiled": True})()
    first, second = compilation.serving(model), compilation.serving(model)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    graphs: list[object] = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    torch.compile(lambda x: torch.sin(x) + 3, backend=counting)(torch.ones(2))
    assert len(graphs) == 1


TRACES_ON_THREADS_THAT_END = """
import threading
import torch
from qwen_edit_worker.engine import compilation  # what every worker process imports before it compiles


def trace(k):
    torch.compile(lambda x: x * k + 1, backend="eager")(torch.ones(3))  # dynamo traces: the CUDA guard is asked for


for k in range(3):  # GPU lanes, idle warm-ups and services that close: threads that trace and end
    thread = threading.Thread(target=trace, args=(k,))
    thread.start()
    thread.join()
print("traced on 3 threads")
"""


def test_traces_on_threads_that_end_do_not_crash_a_process_without_a_gpu():
    """torch's CUDA build keeps dynamo's stand-in CUDA guard in the first tracing thread's
    storage: once that thread ended, the next trace segfaulted the process (it killed the test
    process twice, depending on the order the tests ran in)."""
    import subprocess
    import sys

    from tests.test_handler import ROOT

    done = subprocess.run([sys.executable, "-c", TRACES_ON_THREADS_THAT_END], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "traced on 3 threads" in done.stdout
