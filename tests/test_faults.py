"""Injected faults: every job gets exactly one answer, and a broken worker retires."""

from __future__ import annotations

import asyncio
import time

import torch

from qwen_edit_worker.service import EditService
from tests.runpod_standin import RunPodStandIn
from tests.test_handler import HAT, SAMPLE
from tests.test_runpod_worker import good_job, start_worker, stop_worker


def job(i: int, **extra) -> dict:
    return {"id": f"job-{i}", "input": {"prompt": f"edit number {i}", "images": [SAMPLE, HAT], "seed": i,
                                        "num_inference_steps": 2, "width": 64, "height": 64, **extra}}  # fmt: skip


def run_jobs(service: EditService, jobs: list[dict]) -> list[dict]:
    async def scenario():
        try:
            return await asyncio.gather(*(service.handle(j) for j in jobs))
        finally:
            service.batcher.close(10)

    return asyncio.run(scenario())


def test_out_of_memory_once_splits_the_batch_and_every_job_succeeds(tiny_env, base_holder):
    from config import Settings

    settings = Settings.from_env(tiny_env(MAX_BATCH_SIZE="4", BATCH_WAIT_MS="500"))
    service = EditService(settings, holder=base_holder)
    service.batcher.costs = None  # plain max-size batching: no baseline run alone first
    real, calls = service.engine.run_batch, []

    def oom_once(requests):
        calls.append(len(requests))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(requests)

    service.engine.run_batch = oom_once
    results = run_jobs(service, [job(i) for i in range(4)])
    assert calls == [4, 2, 2]
    assert all("error" not in r and r["batch_size"] == 2 for r in results)
    assert [r["seed"] for r in results] == [0, 1, 2, 3]


def test_a_cuda_error_answers_the_batch_and_the_queue_and_retires_the_worker(tiny_env, base_holder):
    from config import Settings

    settings = Settings.from_env(tiny_env(MAX_BATCH_SIZE="2", BATCH_WAIT_MS="300"))
    retired = []
    service = EditService(settings, holder=base_holder, on_broken=retired.append)

    def broken_gpu(requests):
        time.sleep(0.2)  # let the other jobs queue behind this batch
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    service.engine.run_batch = broken_gpu
    results = run_jobs(service, [job(i) for i in range(5)])
    assert len(retired) == 1
    for result in results:
        assert "illegal memory access" in result["error"] and result["refresh_worker"] is True
    late = run_jobs(service, [job(9)])[0]  # answered at once, without touching the GPU
    assert "illegal memory access" in late["error"]


def test_jobs_waiting_for_a_model_that_fails_to_load_all_get_the_reason(tiny_settings, monkeypatch):
    import model_loader

    def corrupt(settings, *placement):
        time.sleep(0.5)  # the jobs arrive while the weights load
        raise OSError("Error while deserializing header: invalid safetensors file")

    monkeypatch.setattr(model_loader, "load_model", corrupt)
    retired = []
    service = EditService(tiny_settings, holder=model_loader.ModelHolder(tiny_settings), on_broken=retired.append)
    results = run_jobs(service, [job(i) for i in range(4)])
    assert len(retired) == 1
    for result in results:
        assert result["error"].startswith("This worker cannot run jobs (the model failed to load: Error while")
        assert result["refresh_worker"] is True


def test_a_model_that_fails_to_load_answers_every_taken_job_and_the_worker_exits_non_zero(tiny_env, tmp_path):
    standin = RunPodStandIn()
    try:
        jobs = [good_job(i) for i in range(6)]
        standin.add_jobs(jobs)
        log_path = tmp_path / "worker.log"
        # bitsandbytes 4-bit needs a CUDA GPU: on this machine the load fails, as a bad model would.
        proc = start_worker(standin, tiny_env, log_path, PRECISION_MODE="4bit", MAX_CONCURRENCY="2")
        try:
            code = proc.wait(timeout=120)
        except Exception:
            stop_worker(proc, log_path)
            raise
        output = log_path.read_text()
        assert code == 1, (code, output[-3000:])  # a clean exit, not a signal
        assert "terminate called" not in output, output[-3000:]
        with standin.lock:
            taken, answered, left = list(standin.taken), dict(standin.results), len(standin.queue)
        # Whether RunPod handed over jobs before the load failed depends on timing; either way
        # every job taken is answered once with the reason, and the rest stay queued.
        assert sorted(answered) == sorted(taken), output[-3000:]
        for answers in answered.values():
            assert len(answers) == 1
            assert "the model failed to load" in answers[0]["error"] and "needs a CUDA GPU" in answers[0]["error"]
            assert answers[0].get("stopPod") is True  # RunPod replaces the worker
        assert left == len(jobs) - len(taken)  # nothing lost: the rest waits for another worker
    finally:
        standin.close()
