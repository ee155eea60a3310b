"""GPU_PARALLELISM=replicas: a whole pipeline per GPU, each ready batch on a free one.

There is no GPU here: the device choice is checked with the GPU count given, and replicas
run as CPU replicas of the tiny model, each its own pipeline and batcher lane, through the
service and through RunPod's worker loop: the second in a process of its own (the default,
`replica_processes`) or, with REPLICA_PROCESSES=false, on a thread of the worker's process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import model_loader
from config import ConfigError, Settings
from model_loader import ModelHolder
from qwen_edit_worker.engine.edit_engine import EditRequest
from qwen_edit_worker.gpus import gpus
from qwen_edit_worker.gpus.replica_processes import ReplicaLost
from qwen_edit_worker.service import EditService
from tests.conftest import random_image
from tests.image_server import ImageServer
from tests.loras.test_loras import low_rank, written
from tests.test_handler import SAMPLE, decoded
from tests.test_runpod_worker import good_job, pixels, standin, start_worker, stop_worker  # noqa: F401


def settings(**env: str) -> Settings:
    return Settings.from_env({"MODEL_ID": "Qwen/Qwen-Image-Edit-2509", **env})


def two_replicas(tiny_env, processes: str) -> dict[str, str]:
    """Two CPU replicas of the tiny model, one job per batch; the second in a process of its own or not."""
    return tiny_env(GPU_PARALLELISM="replicas", GPU_COUNT="2", MAX_BATCH_SIZE="1", REPLICA_PROCESSES=processes)


@pytest.mark.parametrize(
    ("env", "visible", "expected"),
    [
        ({}, 2, ["cuda:0", "cuda:1"]),  # auto: a replica per GPU
        ({}, 1, ["cuda:0"]),
        ({"GPU_PARALLELISM": "single"}, 4, ["cuda:0"]),
        ({"GPU_COUNT": "3"}, 4, ["cuda:0", "cuda:1", "cuda:2"]),
        ({"GPU_PARALLELISM": "replicas", "GPU_COUNT": "1"}, 2, ["cuda:0"]),
        ({"PRECISION_MODE": "4bit"}, 2, ["cuda:0"]),  # bitsandbytes places its layers on the first GPU
        ({"GPU_PARALLELISM": "replicas", "GPU_COUNT": "2"}, 0, ["cpu", "cpu"]),  # the tests' CPU replicas
        ({}, 0, ["cpu"]),
    ],
)
def test_replica_devices(env, visible, expected):
    assert [str(d) for d in gpus.replica_devices(settings(**env), visible=visible)] == expected


def test_more_gpus_than_visible_is_refused_with_a_sentence():
    with pytest.raises(ConfigError, match=r"^GPU_COUNT must be at most the number of GPUs this worker sees \(2\); got 3\.$"):
        gpus.replica_devices(settings(GPU_COUNT="3"), visible=2)
    with pytest.raises(ConfigError, match="GPU_PARALLELISM must be one of auto, single, replicas, context"):
        settings(GPU_PARALLELISM="pipeline")


def test_two_replica_threads_share_the_jobs_and_give_one_devices_pixels(tiny_env, base_holder):
    replicated = Settings.from_env(two_replicas(tiny_env, "false"))
    jobs = [{"id": f"j{i}", "input": {"prompt": f"prompt {i % 3}", "image_base64": SAMPLE, "seed": 10 + i,
                                       "num_inference_steps": 2, "width": 64, "height": 64}} for i in range(6)]  # fmt: skip

    async def serve(service: EditService, close: bool = True) -> list[dict]:
        answers = await asyncio.gather(*(service.handle(job) for job in jobs))
        if close:
            service.batcher.close(10)
        return answers

    service = EditService(replicated)
    assert [h.device for h in service.replicas] == [torch.device("cpu")] * 2
    encoders: set[int] = set()
    for n, engine in enumerate(service.engines):
        real_ahead = engine.encode_ahead
        engine.encode_ahead = lambda request, n=n, real=real_ahead: (encoders.add(n), real(request))[1]
    lanes_used: set[str] = set()
    for engine in service.engines:
        real = engine.run_batch

        def recorded(requests, real=real):
            lanes_used.add(threading.current_thread().name)
            return real(requests)

        engine.run_batch = recorded
    two = asyncio.run(serve(service, close=False))
    assert service.replicas[0].get() is not service.replicas[1].get()  # two pipelines
    assert lanes_used == {"gpu-batcher", "gpu-batcher-1"}
    encoders.clear()
    asyncio.run(serve(service))  # every replica has started now
    assert encoders == {0, 1}  # prompts are encoded ahead on both replicas in turn
    one = asyncio.run(serve(EditService(Settings.from_env(tiny_env(MAX_BATCH_SIZE="1")), holder=base_holder)))
    for a, b in zip(two, one):
        assert a["seed"] == b["seed"]
        assert np.array_equal(np.asarray(decoded(a["output_image_base64"])), np.asarray(decoded(b["output_image_base64"])))


def test_a_job_that_comes_while_replicas_start_does_not_load_the_next_one_out_of_turn(tiny_env, monkeypatch):
    """Its prompt is encoded ahead on the first replica. Asking the second's engine would load
    it on the event loop while the first still compiles, and compiling the second then breaks
    the first's graphs (seen on two H200s: "Detected that you are using FX to symbolically
    trace a dynamo-optimized function")."""
    service = EditService(Settings.from_env(two_replicas(tiny_env, "false")))
    events: list[str] = []
    first = service.replicas[0]
    real_first, real_load = first.get, model_loader.load_model

    def first_get():
        model = real_first()
        if threading.current_thread().name == "gpu-batcher" and "first started" not in events:
            threading.Event().wait(1.0)  # the first replica's compile warm-up
            events.append("first started")
        return model

    def load_model(settings, device, replica=0, *args, **kwargs):
        if replica:
            events.append("second loads")
        return real_load(settings, device, replica, *args, **kwargs)

    first.get = first_get
    monkeypatch.setattr(model_loader, "load_model", load_model)

    async def serve():
        answer = await service.handle({"id": "j", "input": {"prompt": "x", "image_base64": SAMPLE, "num_inference_steps": 1}})
        service.batcher.close(10)
        return answer

    assert "output_image_base64" in asyncio.run(serve())
    assert events == ["first started", "second loads"]


def test_replica_processes_through_the_runpod_worker_loop(standin, tiny_env, tmp_path):  # noqa: F811
    """The second replica in a process of its own (REPLICA_PROCESSES=true), through RunPod's
    loop: the jobs go to both lanes once both serve, the same input gives the same pixels on either, and
    SIGTERM stops the replica's process with the worker."""
    log_path = tmp_path / "worker.log"
    proc = start_worker(standin, tiny_env, log_path, GPU_PARALLELISM="replicas", GPU_COUNT="2", MAX_BATCH_SIZE="1",
                        MAX_CONCURRENCY="8", REPLICA_PROCESSES="true")  # fmt: skip
    jobs = [good_job(i) for i in range(6)] + [dict(good_job(i), id=f"repeat-{i}") for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        while "replica-1 ready" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        standin.add_jobs(jobs)
        finished = standin.wait_for_results(len(jobs), timeout=240)
    finally:
        code, output = stop_worker(proc, log_path)
    assert finished and code == 0, output[-4000:]
    assert sorted(standin.results) == sorted(job["id"] for job in jobs)
    assert all(len(answers) == 1 and "error" not in answers[0] for answers in standin.results.values())
    assert "on lane 0" in output and "on lane 1" in output
    for i in range(2):
        assert np.abs(pixels(standin.results[f"good-{i}"][0]) - pixels(standin.results[f"repeat-{i}"][0])).max() <= 1
    children = [int(pid) for pid in re.findall(r"replica-1 ready \(process (\d+)\)", output)]
    assert children and not any(Path(f"/proc/{pid}").exists() for pid in children)


def replica_jobs(count: int, steps: int = 2) -> list[dict]:
    return [{"id": f"j{i}", "input": {"prompt": f"prompt {i % 3}", "image_base64": SAMPLE, "seed": 10 + i,
                                      "num_inference_steps": steps, "width": 64, "height": 64}} for i in range(count)]  # fmt: skip


def test_a_replica_process_gives_one_devices_pixels_and_reports_progress(tiny_env, base_holder):
    steps: dict[str, list[int]] = {}
    service = EditService(Settings.from_env(two_replicas(tiny_env, "true")),
                          progress=lambda job, update: steps.setdefault(job["id"], []).append(update["step"]))  # fmt: skip
    jobs = replica_jobs(6, steps=4)
    try:
        assert len(service.replicas) == 1 and [r.name for r in service.remotes] == ["replica-1"]
        assert service.remotes[0].ready.wait(240)
        os.kill(service.remotes[0].process.pid, signal.SIGTERM)  # RunPod's stop, sent to the process group
        two = asyncio.run(serve_all(service, jobs))
        remote_batches = service.remotes[0].batches
    finally:
        service.close()
    assert 1 <= remote_batches <= 5  # both lanes ran jobs
    assert not service.remotes[0].process.is_alive()
    assert all(steps[job["id"]] == [2, 4] for job in jobs)  # from either lane, as they happened
    one = asyncio.run(serve_all(EditService(Settings.from_env(tiny_env(MAX_BATCH_SIZE="1")), holder=base_holder), jobs))
    for a, b in zip(two, one):
        assert "error" not in a and a["seed"] == b["seed"]
        assert np.array_equal(np.asarray(decoded(a["output_image_base64"])), np.asarray(decoded(b["output_image_base64"])))


def test_a_replica_process_applies_the_endpoints_loras_as_one_device_does(tiny_env, base_holder):
    """LORAS reach the replica process (each batch it runs carries them, from the same file on
    the shared disk): the same pixels as one device with them, not the base's."""
    server = ImageServer()
    reference = ModelHolder(Settings.from_env(tiny_env()))  # a model of its own: LoRAs change its modules
    server.serve_bytes("/style.safetensors", written(low_rank(reference.get().pipe, seed=3), "kohya"))
    loras = json.dumps([{"path": server.url("/style.safetensors"), "scale": 1.5}])
    jobs = replica_jobs(4)
    endpoint = dict(two_replicas(tiny_env, "true"), ALLOW_PRIVATE_IMAGE_URLS="true", LORAS=loras)
    service = EditService(Settings.from_env(endpoint))
    try:
        assert service.remotes[0].ready.wait(240)
        two = asyncio.run(serve_all(service, jobs))
        remote_batches = service.remotes[0].batches
        with_lora = Settings.from_env(tiny_env(MAX_BATCH_SIZE="1", ALLOW_PRIVATE_IMAGE_URLS="true", LORAS=loras))
        one = asyncio.run(serve_all(EditService(with_lora, holder=reference), jobs))
    finally:
        service.close()
        server.close()
    base = asyncio.run(serve_all(EditService(Settings.from_env(tiny_env(MAX_BATCH_SIZE="1")), holder=base_holder), jobs))
    assert 1 <= remote_batches <= 3
    for a, b, c in zip(two, one, base):
        assert a["loras"][0]["scale"] == 1.5 and np.array_equal(pixels_of(a), pixels_of(b))
        assert not np.array_equal(pixels_of(a), pixels_of(c))


@pytest.fixture
def process_replicas(tiny_env):
    """A worker whose second replica runs in a process of its own, once that process serves."""
    service = EditService(Settings.from_env(two_replicas(tiny_env, "true")))
    try:
        assert service.remotes[0].ready.wait(240)
        yield service
    finally:
        service.close()


def red_roof() -> EditRequest:
    return EditRequest(prompt="a red roof", images=(random_image(64, 64),), seed=5, num_inference_steps=2,
                       true_cfg_scale=1.0, width=64, height=64)  # fmt: skip


def test_prompt_embeddings_made_ahead_on_one_gpu_serve_a_batch_on_the_other(process_replicas):
    """Prompts are encoded as jobs arrive, by each GPU's text encoder in turn, and a batch takes
    them on whichever GPU it runs: embeddings of another prompt than the request's give that
    other prompt's pixels, made by the worker for the process and by the process for the worker."""
    service, remote, asked = process_replicas, process_replicas.remotes[0], red_roof()
    expected = service.engine.run_batch([asked])[0].images[0]
    by_the_worker = dataclasses.replace(service.engine.encode_ahead(asked), prompt="something else entirely")
    by_the_process = dataclasses.replace(remote.encode_ahead(asked), prompt="something else entirely")
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in by_the_process.prompts.result(60) if t is not None)
    on_the_process = remote.run_batch([by_the_worker])[0].images[0]
    on_the_worker = service.engine.run_batch([by_the_process])[0].images[0]
    assert np.array_equal(on_the_process, expected) and np.array_equal(on_the_worker, expected)
    assert {type(service._encoder()).__name__ for _ in range(4)} == {"EditEngine", "ReplicaProcess"}  # both in turn


def test_prompts_given_to_a_replica_process_that_stops_fail_as_lost(process_replicas):
    """An encode the process had not answered when it stopped, and one asked after, fail with
    `ReplicaLost` (which retires the worker), not wait forever."""
    remote = process_replicas.remotes[0]
    os.kill(remote.process.pid, signal.SIGSTOP)  # it cannot answer
    pending = remote.encode_ahead(red_roof()).prompts
    os.kill(remote.process.pid, signal.SIGKILL)
    after = remote.encode_ahead(red_roof()).prompts
    for future in (pending, after):
        with pytest.raises(ReplicaLost, match=r"^replica-1 of the GPU processes stopped \(exit code -9\)$"):
            future.result(30)


def pixels_of(answer: dict) -> np.ndarray:
    assert "output_image_base64" in answer, answer
    return np.asarray(decoded(answer["output_image_base64"]))


def test_a_replica_process_that_dies_mid_batch_retires_the_worker_and_each_job_is_answered_once(tiny_env):
    broken: list[BaseException] = []

    def kill_the_replica_process(job: dict, update: dict) -> None:
        if threading.current_thread().name == "gpu-batcher-1":  # the lane of the replica process
            os.kill(service.remotes[0].process.pid, signal.SIGKILL)

    service = EditService(Settings.from_env(two_replicas(tiny_env, "true")),
                          progress=kill_the_replica_process, on_broken=broken.append)  # fmt: skip
    try:
        assert service.remotes[0].ready.wait(240)
        answers = asyncio.run(serve_all(service, replica_jobs(4, steps=4)))
    finally:
        service.close()
    assert len(answers) == 4
    lost = [a for a in answers if a.get("refresh_worker")]
    assert lost and all("output_image_base64" in a or a.get("refresh_worker") for a in answers)
    assert any("replica-1 of the GPU processes stopped (exit code -9)" in a["error"] for a in lost)
    assert len(broken) == 1 and "replica-1 of the GPU processes stopped" in str(broken[0])


async def serve_all(service: EditService, jobs: list[dict]) -> list[dict]:
    return await asyncio.gather(*(service.handle(job) for job in jobs))


def test_no_replica_serves_before_all_are_compiled_and_then_nothing_compiles(tiny_env):
    from qwen_edit_worker.engine.side_stream import FENCE

    service = EditService(Settings.from_env(two_replicas(tiny_env, "false")))
    events: list[str] = []
    slow = service.replicas[1]
    real_get = slow.get

    def slow_get():
        model = real_get()
        if "replica 1 ready" not in events:
            threading.Event().wait(1.0)  # a second GPU still reading its weights
            events.append("replica 1 ready")
        return model

    slow.get = slow_get
    for engine in service.engines:
        real = engine.run_batch
        engine.run_batch = lambda requests, real=real: (events.append("batch"), real(requests))[1]

    async def serve():
        answer = await service.handle({"id": "j", "input": {"prompt": "x", "image_base64": SAMPLE, "num_inference_steps": 1}})
        service.batcher.close(10)
        return answer

    assert "output_image_base64" in asyncio.run(serve())
    assert events.index("replica 1 ready") < events.index("batch")

    compiled = torch.compile(lambda x: x * 2, backend="eager")
    compiled(torch.ones(2))
    before = FENCE.compiles
    compiled(torch.ones(2, 3))  # a new shape: with replicas serving, it runs eagerly
    assert FENCE.compiles == before
