"""One transformer forward across two ranks on gloo (the CPU stand-in for NCCL): the same
result as one process, for any text length, compiled as one graph."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch.multiprocessing as mp

from tests.gpus.rank_forward import rank_forward
from tests.test_handler import ROOT
from tests.test_runpod_worker import good_job, serve_jobs, standin  # noqa: F401


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_ranks_give_one_process_result_for_texts_of_any_length(tiny_settings, tmp_path, compiled):
    from qwen_edit_worker.testing.tiny_model import ensure_tiny_model

    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    mp.spawn(rank_forward, args=(2, str(tmp_path / "store"), path, compiled, str(tmp_path / "result")), nprocs=2)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert max(result["errors"]) <= 1e-5, result  # float32
        assert result["breaks"] == 0  # no .item(), no graph break: the split sizes are the host's
        # One graph for the three text lengths, one for two samples with a padded text, one for
        # their odd image size (each rank's share of the image tokens is a host number). The
        # same on every rank: rank 1's share of the first block's input was once a view with a
        # storage offset, which the later blocks' inputs lack, and compiled a graph of its own.
        assert result["graphs"] == (3 if compiled else 0), result


def test_four_ranks_with_two_heads_each_and_fa3s_key_order_give_one_process_result(tmp_path):
    # the tiny pipeline has two heads, one per rank: here each rank sends and receives head
    # groups among three peers, which is where an order of sources or heads could go wrong; the
    # ranks attend with FlashAttention-3's key order (`flash_attention`), the one process with SDPA
    mp.spawn(rank_forward, args=(4, str(tmp_path / "store"), None, False, str(tmp_path / "result"), True), nprocs=4)
    for rank in range(4):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert max(result["errors"]) <= 1e-5, result


def _service_job(job_id: str, prompt: str) -> dict:
    from tests.test_handler import SAMPLE

    return {"id": job_id, "input": {"prompt": prompt, "image_base64": SAMPLE, "seed": 5, "num_inference_steps": 2,
                                    "width": 64, "height": 64}}  # fmt: skip


@pytest.mark.parametrize("compiled", ["false", "true"], ids=["eager", "compiled"])
def test_context_mode_gives_one_process_pixels_and_a_lost_rank_retires_the_worker(inductor_cache, tiny_env, tmp_path, monkeypatch, compiled,
                                                                                 caplog):  # fmt: skip
    import asyncio
    import time

    from config import Settings
    from qwen_edit_worker.service import EditService
    from tests.loras.test_loras import pixels

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    env = tiny_env(MAX_LORAS="0", MAX_BATCH_SIZE="1", COMPILE_TRANSFORMER=compiled)
    jobs = [_service_job("short", "blue"), _service_job("long", "make the sky a deep blue with a few clouds")]
    alone = EditService(Settings.from_env(env))
    expected = [pixels(asyncio.run(alone.handle(job))) for job in jobs]
    alone.close()

    broken = []
    service = EditService(Settings.from_env(dict(env, GPU_PARALLELISM="context", GPU_COUNT="2")), on_broken=broken.append)
    try:
        answers = [asyncio.run(service.handle(job)) for job in jobs]
        for answer, image in zip(answers, expected):
            assert np.abs(pixels(answer) - image).max() <= 1, answer.get("error")
        assert service.followers.processes[0].is_alive()
        service.followers.processes[0].kill()
        time.sleep(1)
        lost = asyncio.run(service.handle(_service_job("after", "blue")))
    finally:
        service.close()
    assert lost["refresh_worker"] is True and "GPU processes stopped" in lost["error"]
    assert len(broken) == 1  # retired once
    assert "rank-1 stopped: ending the process group" in caplog.text  # the watch saw it at once


def test_the_watch_calls_back_when_a_process_ends_and_not_before():
    import multiprocessing
    import threading
    import time

    from qwen_edit_worker.gpus import context_ranks

    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(2.0,))
    process.start()
    called, names = threading.Event(), []
    start = time.perf_counter()
    context_ranks.watch([process], lambda ended: (names.extend(ended), called.set()))
    assert not called.wait(0.5)
    assert called.wait(30) and time.perf_counter() - start >= 1.5
    assert names == [process.name]
    process.join()


def killed_and_seen_late(process, lag_s: float = 1.0) -> None:
    """SIGKILL a follower, its exit seen `lag_s` late: the kernel closes a killed process's
    sockets (rank 0's collective fails at once) a moment before its parent can see it stopped,
    and under load that moment grows. Here it is made long enough to be met every time."""
    process.kill()
    seen_from = time.monotonic() + lag_s
    exited = process.is_alive
    process.is_alive = lambda: time.monotonic() < seen_from or exited()


@pytest.mark.parametrize("compiled", ["false", "true"], ids=["eager", "compiled"])
def test_a_rank_killed_in_the_middle_of_a_job_fails_it_once_and_retires_the_worker(tiny_env, compiled):
    """Compiled, the broken collective's error comes out of the graph with no torch.distributed
    frame in its traceback: only gloo's or NCCL's words say what it was."""
    import asyncio

    from config import Settings
    from qwen_edit_worker.service import EditService

    broken = []
    env = tiny_env(GPU_PARALLELISM="context", GPU_COUNT="2", MAX_BATCH_SIZE="1", MAX_LORAS="0", COMPILE_TRANSFORMER=compiled)
    service = EditService(Settings.from_env(env), on_broken=broken.append)
    long_job = _service_job("long", "blue")
    long_job["input"]["num_inference_steps"] = 100

    async def scenario():
        assert "error" not in await service.handle(_service_job("first", "blue"))  # started, both ranks serving
        running = asyncio.ensure_future(service.handle(long_job))
        await asyncio.sleep(1.5)
        assert not running.done()
        killed_and_seen_late(service.followers.processes[0])
        return await running

    try:
        answer = asyncio.run(scenario())
    finally:
        service.close()
    assert answer["refresh_worker"] is True and "GPU processes stopped" in answer["error"], answer
    assert len(broken) == 1


def test_a_rank_lost_while_a_batch_is_retried_eagerly_is_named_as_such(tiny_env):
    """A batch whose compile fails is run again eagerly; a follower that stops during that run
    retires the worker with the sentence of a stopped GPU process, not gloo's or NCCL's
    message (and on NCCL, not with what the aborted collectives left as an image)."""
    import asyncio

    import torch

    from config import Settings
    from qwen_edit_worker.service import EditService

    service = EditService(Settings.from_env(tiny_env(GPU_PARALLELISM="context", GPU_COUNT="2", MAX_BATCH_SIZE="1")))
    engine, follower = service.engines[0], None
    run_batch, calls = engine.run_batch, []

    def compile_fails_then_a_rank_stops(module, args, kwargs):
        if len(calls) == 2 and follower.is_alive():  # the retry's first forward, announced already
            follower.kill()
            follower.join()

    def failing_once(requests):
        calls.append(len(requests))
        if len(calls) == 1:
            raise torch._dynamo.exc.TorchDynamoException("inductor could not compile this shape")
        return run_batch(requests)

    async def scenario():
        nonlocal follower
        assert "error" not in await service.handle(_service_job("first", "blue"))  # started, both ranks serving
        model = service.replicas[0].get()
        model.compiled = True  # as if compiled: its failure is retried eagerly
        follower = service.followers.processes[0]
        model.pipe.transformer.register_forward_pre_hook(compile_fails_then_a_rank_stops, with_kwargs=True)
        engine.run_batch = failing_once
        return await service.handle(_service_job("second", "blue"))

    try:
        answer = asyncio.run(scenario())
    finally:
        service.close()
    assert len(calls) == 2, calls
    assert answer["refresh_worker"] is True and "GPU processes stopped" in answer["error"], answer


def test_context_mode_refuses_what_it_does_not_take_yet(tiny_env):
    from config import ConfigError, Settings

    with pytest.raises(ConfigError, match=r"^GPU_PARALLELISM=context needs PRECISION_MODE bf16 or fp8; got 4bit\.$"):
        Settings.from_env(tiny_env(GPU_PARALLELISM="context", PRECISION_MODE="4bit"))
    with pytest.raises(ConfigError, match=r"^GPU_PARALLELISM=context keeps every weight on the GPUs"):
        Settings.from_env(tiny_env(GPU_PARALLELISM="context", CPU_OFFLOAD="model"))
    assert Settings.from_env(tiny_env(GPU_PARALLELISM="context")).gpu_parallelism == "context"


def test_context_mode_applies_per_request_loras_as_one_process(inductor_cache, tiny_env, tmp_path, monkeypatch):
    """Every rank makes rank 0's LoRA changes itself (hot-swapped into the compiled slots, as on
    a GPU): the same images as one process (uncompiled there: diffusers' own LoRA loading, which
    the slots must match anyway)."""
    import asyncio

    from config import Settings
    from qwen_edit_worker.service import EditService
    from qwen_edit_worker.testing.tiny_model import build_tiny_pipeline
    from tests.conftest import wait_for_idle_warm_ups
    from tests.image_server import ImageServer
    from tests.loras.test_loras import job, low_rank, pixels, written

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    server = ImageServer()
    pipe = build_tiny_pipeline()
    server.serve_bytes("/one.safetensors", written(low_rank(pipe, seed=3), "lightx2v"))
    server.serve_bytes("/two.safetensors", written(low_rank(pipe, seed=4, kind=".img_mlp."), "kohya"))
    one = [{"path": server.url("/one.safetensors"), "scale": 1.5}]
    both = [{"path": server.url("/two.safetensors")}, {"path": server.url("/one.safetensors"), "scale": -0.5}]
    jobs = [job(one, seed=1), job(both, seed=2), job(seed=1), job(one, seed=1)]  # the LoRA off, then on again
    env = tiny_env(MAX_BATCH_SIZE="1", MAX_LORAS="2", ALLOW_PRIVATE_IMAGE_URLS="true", COMPILE_TRANSFORMER="true",
                   MODEL_DIR=str(tmp_path))  # fmt: skip

    def answers(settings: Settings) -> list[dict]:
        service = EditService(settings)
        try:
            if settings.compile_transformer:  # jobs after the slots' graphs, as on a worker up for a while:
                service.started.wait(120)  # compiles on a job are the subject of `test_compilation`
                wait_for_idle_warm_ups(service)
            return [asyncio.run(service.handle(j)) for j in jobs]
        finally:
            service.close()

    try:
        alone = answers(Settings.from_env(dict(env, COMPILE_TRANSFORMER="false")))
        split = answers(Settings.from_env(dict(env, GPU_PARALLELISM="context", GPU_COUNT="2")))
    finally:
        server.close()
    for a, b in zip(alone, split):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert np.abs(pixels(split[0]) - pixels(split[2])).max() > 3  # the LoRA did change the image
    assert np.abs(pixels(split[0]) - pixels(split[3])).max() <= 1


NEVER_JOINS = """
import sys
import time
from datetime import timedelta
import torch
from qwen_edit_worker.gpus import context_ranks
from config import Settings
context_ranks.TIMEOUT = timedelta(seconds=5)
followers = context_ranks.Followers(Settings.from_env(), [torch.device("cpu")] * 2)
followers.processes[0].kill()  # before it could join
followers.processes[0].join()
try:
    followers.join()
except context_ranks.RankLost as error:
    print("LOST " + str(error))
followers.stop()
"""


def test_a_rank_that_never_joins_stops_the_start_with_a_sentence(tiny_env):
    """In its own process: a failed rendezvous leaves state behind that a later one in the same
    process trips over (a worker exits after one)."""
    import os
    import subprocess

    env = {**os.environ, **tiny_env(GPU_PARALLELISM="context", GPU_COUNT="2", MAX_LORAS="0")}
    done = subprocess.run([sys.executable, "-c", NEVER_JOINS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("LOST ")]
    assert lines and lines[0] == "LOST the GPU processes could not form a process group: rank-1 stopped while starting", (
        done.stdout + done.stderr[-2000:])  # fmt: skip


def test_context_mode_through_the_runpod_worker_loop_drains_every_rank(standin, tiny_env, tmp_path):  # noqa: F811
    import os
    import re

    jobs = [good_job(i) for i in range(4)]
    output = serve_jobs(standin, tiny_env, tmp_path, jobs, GPU_PARALLELISM="context", GPU_COUNT="2", MAX_LORAS="0",
                        MAX_BATCH_SIZE="2")  # fmt: skip
    assert all("error" not in answers[0] for answers in standin.results.values())
    follower = int(re.search(r"rank 1 ready \(process (\d+)\)", output).group(1))
    with pytest.raises(ProcessLookupError):  # stopped with the worker
        os.kill(follower, 0)


def test_ranks_idle_between_jobs_longer_than_their_timeout(tiny_env, monkeypatch):
    """A worker waits for jobs for as long as RunPod keeps it: the followers' wait for the next
    forward must not be a collective, which would time out."""
    import asyncio
    import time
    from datetime import timedelta

    from config import Settings
    from qwen_edit_worker.gpus import context_ranks
    from qwen_edit_worker.service import EditService

    monkeypatch.setattr(context_ranks, "TIMEOUT", timedelta(seconds=5))
    service = EditService(Settings.from_env(tiny_env(GPU_PARALLELISM="context", GPU_COUNT="2", MAX_LORAS="0",
                                                     MAX_BATCH_SIZE="1")))  # fmt: skip
    try:
        first = asyncio.run(service.handle(_service_job("first", "blue")))
        time.sleep(8)  # idle for longer than the timeout
        second = asyncio.run(service.handle(_service_job("second", "blue")))
        assert not service.followers.lost()
    finally:
        service.close()
    assert "error" not in first and first["output_image_base64"] == second["output_image_base64"], second.get("error")
