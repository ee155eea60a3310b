"""The batcher with a fake engine: grouping, limits, fairness, isolation, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from batching import Batcher, BatcherClosed, CostModel


@dataclass(frozen=True)
class Job:
    name: str
    key: str = "a"
    fail: bool = False


class FakeOOM(RuntimeError):
    pass


class FakeEngine:
    """Records each batch; can hold the GPU thread at a gate; fails where told."""

    def __init__(self, oom_above: int | None = None):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.oom_above = oom_above

    def __call__(self, jobs):
        self.started.set()
        self.gate.wait(10)
        self.batches.append([j.name for j in jobs])
        if self.oom_above is not None and len(jobs) > self.oom_above:
            raise FakeOOM("out of memory")
        if any(j.fail for j in jobs):
            raise ValueError("bad job in batch")
        return [f"done:{j.name}:{len(jobs)}" for j in jobs]


def make(engine, max_batch_size=4, max_wait_s=10.0):
    return Batcher(engine, key=lambda j: j.key, max_batch_size=max_batch_size, max_wait_s=max_wait_s, adaptive=False,
                   is_out_of_memory=lambda e: isinstance(e, FakeOOM))  # fmt: skip


async def hold_gpu(batcher, engine) -> asyncio.Future:
    """Occupy the GPU thread with one job so that what follows queues behind it."""
    engine.gate.clear()
    blocker = batcher.submit(Job("blocker", key="blocker"))
    await asyncio.to_thread(engine.started.wait, 5)
    return blocker


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_full_batch_leaves_at_once_without_waiting():
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=3, max_wait_s=60)

    async def scenario():
        return await asyncio.gather(*(batcher.submit(Job(f"j{i}")) for i in range(3)))

    assert run(scenario()) == ["done:j0:3", "done:j1:3", "done:j2:3"]
    assert engine.batches == [["j0", "j1", "j2"]]


def test_a_lone_request_leaves_after_max_wait():
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=8, max_wait_s=0.2)

    async def scenario():
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await batcher.submit(Job("alone"))
        return result, loop.time() - start

    result, waited = run(scenario())
    assert result == "done:alone:1"
    assert 0.15 <= waited < 2


def batches_formed_behind_a_busy_gpu(max_batch_size: int, jobs: list[tuple[Job, int]]) -> list[list[str]]:
    """Queue `jobs` (each with its slot count) while the GPU is busy, release it, and return
    the batches they ran in."""
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=max_batch_size, max_wait_s=0.05)

    async def scenario():
        blocker = await hold_gpu(batcher, engine)
        futures = [batcher.submit(job, size=size) for job, size in jobs]
        engine.gate.set()
        await blocker
        return await asyncio.gather(*futures)

    run(scenario())
    return engine.batches[1:]


def test_batches_never_exceed_max_size_and_sizes_count_images():
    jobs = [(Job(n), s) for n, s in [("a", 2), ("b", 1), ("c", 2), ("d", 1), ("e", 4)]]
    assert batches_formed_behind_a_busy_gpu(4, jobs) == [["a", "b"], ["c", "d"], ["e"]]


def test_keys_never_mix_and_the_oldest_ready_group_goes_first():
    jobs = [(Job(n, key=k), 1) for n, k in [("x1", "x"), ("y1", "y"), ("x2", "x"), ("y2", "y"), ("x3", "x")]]
    assert batches_formed_behind_a_busy_gpu(2, jobs) == [["x1", "x2"], ["y1", "y2"], ["x3"]]


def test_one_failing_request_fails_alone():
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=3, max_wait_s=60)

    async def scenario():
        futures = [batcher.submit(Job("good1")), batcher.submit(Job("bad", fail=True)), batcher.submit(Job("good2"))]
        return await asyncio.gather(*futures, return_exceptions=True)

    good1, bad, good2 = run(scenario())
    assert good1 == "done:good1:1" and good2 == "done:good2:1"
    assert isinstance(bad, ValueError)
    assert engine.batches == [["good1", "bad", "good2"], ["good1"], ["bad"], ["good2"]]


def test_out_of_memory_splits_the_batch_in_halves():
    engine = FakeEngine(oom_above=1)
    batcher = make(engine, max_batch_size=4, max_wait_s=60)

    async def scenario():
        return await asyncio.gather(*(batcher.submit(Job(f"j{i}")) for i in range(4)))

    assert run(scenario()) == ["done:j0:1", "done:j1:1", "done:j2:1", "done:j3:1"]
    assert engine.batches == [["j0", "j1", "j2", "j3"], ["j0", "j1"], ["j0"], ["j1"], ["j2", "j3"], ["j2"], ["j3"]]


def test_a_request_cancelled_while_queued_never_reaches_the_gpu():
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=4, max_wait_s=0.05)

    async def scenario():
        blocker = await hold_gpu(batcher, engine)
        keep, drop = batcher.submit(Job("keep")), batcher.submit(Job("drop"))
        drop.cancel()
        engine.gate.set()
        await blocker
        return await keep

    assert run(scenario()) == "done:keep:1"
    assert engine.batches == [["blocker"], ["keep"]]


def test_cancelling_one_member_of_a_running_batch_leaves_the_others_intact():
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=2, max_wait_s=60)

    async def scenario():
        engine.gate.clear()
        first, second = batcher.submit(Job("first")), batcher.submit(Job("second"))
        await asyncio.to_thread(engine.started.wait, 5)
        first.cancel()
        engine.gate.set()
        return await second, first.cancelled()

    assert run(scenario()) == ("done:second:2", True)


def test_close_drains_what_is_queued_then_refuses_new_requests():
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=4, max_wait_s=60)

    async def scenario():
        futures = [batcher.submit(Job(f"j{i}")) for i in range(2)]
        await asyncio.to_thread(batcher.close, 10)
        with pytest.raises(BatcherClosed):
            batcher.submit(Job("late"))
        return await asyncio.gather(*futures)

    assert run(scenario()) == ["done:j0:2", "done:j1:2"]


class TimedEngine:
    """Sleeps like a GPU would: `solo_s` per image alone, `shared_s` per image in a shared batch."""

    def __init__(self, solo_s: float, shared_s: float):
        self.solo_s, self.shared_s = solo_s, shared_s
        self.batches: list[list[str]] = []

    def __call__(self, jobs):
        self.batches.append([j.name for j in jobs])
        time.sleep(len(jobs) * (self.shared_s if len(jobs) > 1 else self.solo_s))
        return [j.name for j in jobs]


def adaptive(engine, max_wait_s):
    return Batcher(engine, key=lambda j: j.key, max_batch_size=2, max_wait_s=max_wait_s)


async def submit_together(batcher, *names):
    return await asyncio.gather(*(batcher.submit(Job(n)) for n in names))


async def build_baseline(batcher):
    for name in ("w0", "w1", "w2"):  # the first run of a shape is not counted; two alone make a baseline
        await submit_together(batcher, name)


def test_batches_that_measure_slower_per_image_are_no_longer_formed_or_waited_for():
    engine = TimedEngine(solo_s=0.01, shared_s=0.05)
    batcher = adaptive(engine, max_wait_s=0.2)

    async def scenario():
        await build_baseline(batcher)
        await submit_together(batcher, "p0", "p1")  # the first shared pair: not counted
        await submit_together(batcher, "p2", "p3")  # measured slower per image than alone
        assert batcher.costs.target("a", 2) == 1
        loop = asyncio.get_running_loop()
        start = loop.time()
        await submit_together(batcher, "q1", "q2")
        return loop.time() - start

    took = run(scenario())
    assert engine.batches == [["w0"], ["w1"], ["w2"], ["p0", "p1"], ["p2", "p3"], ["q1"], ["q2"]]
    assert took < 0.15  # nobody waited for a partner that would only slow things down


def test_batches_that_measure_faster_keep_being_formed():
    engine = TimedEngine(solo_s=0.02, shared_s=0.005)
    batcher = adaptive(engine, max_wait_s=0.2)

    async def scenario():
        await build_baseline(batcher)
        for i in range(3):
            await submit_together(batcher, f"a{i}", f"b{i}")

    run(scenario())
    assert engine.batches == [["w0"], ["w1"], ["w2"], ["a0", "b0"], ["a1", "b1"], ["a2", "b2"]]


def test_cost_model_compares_shared_batches_with_smaller_ones_and_reprobes():
    costs = CostModel(reprobe_after=3)
    for slots, shared in [(1, False), (2, True), (4, True), (2, False)]:
        costs.record("k", slots, shared=shared, seconds=100.0)  # first of each shape: compile time, ignored
    assert not costs.has_baseline("k") and costs.target("k", 4) == 4
    costs.record("k", 1, shared=False, seconds=1.5)
    costs.record("k", 1, shared=False, seconds=1.0)
    assert costs.has_baseline("k") and costs.per_image("k", 1, shared=False) == 1.0  # the minimum
    costs.record("k", 2, shared=True, seconds=1.0)  # 0.5 s per image: better than alone
    assert costs.allows("k", 2) and costs.target("k", 4) == 4  # 3 and 4 not measured yet
    costs.record("k", 4, shared=True, seconds=4.0)  # 1.0 per image: worse than pairs
    assert not costs.allows("k", 4) and costs.target("k", 4) == 2 and costs.target("k", 8) == 2
    costs.record("k", 2, shared=False, seconds=0.2)  # one request of two images, unmasked: 0.1
    assert not costs.allows("k", 2) and costs.target("k", 8) == 1  # a shared (masked) pair is slower
    assert costs.per_image("k", 2, shared=True) == 0.5
    for _ in range(3):
        costs.record("k", 1, shared=False, seconds=1.0)
    assert costs.allows("k", 4)  # measured 4 batches ago, with reprobe_after=3: try again
    assert costs.allows("other-key", 4)


def test_after_a_slower_size_the_next_try_is_half_of_it():
    costs = CostModel()
    for _ in range(2):  # the first of each shape is not counted
        costs.record("k", 1, shared=False, seconds=1.0)
        costs.record("k", 8, shared=True, seconds=16.0)  # 2.0 per image: slower than alone
    assert costs.target("k", 8) == 4
    for _ in range(2):
        costs.record("k", 4, shared=True, seconds=6.0)  # 1.5 per image: slower too
    assert costs.target("k", 8) == 2


def test_a_key_runs_requests_alone_first_to_have_a_baseline():
    engine = TimedEngine(solo_s=0.01, shared_s=0.005)
    batcher = adaptive(engine, max_wait_s=0.05)
    run(submit_together(batcher, "a", "b", "c", "d", "e"))  # a warms up; b and c measure the baseline
    assert engine.batches == [["a"], ["b"], ["c"], ["d", "e"]]


def test_the_cost_model_keeps_a_bounded_number_of_keys():
    costs = CostModel(max_keys=3)
    for n in range(10):
        for _ in range(3):
            costs.record(f"key-{n}", 1, shared=False, seconds=1.0)
    assert costs.keys == 3
    assert costs.has_baseline("key-9") and not costs.has_baseline("key-0")  # the oldest were forgotten
    costs.record("key-7", 1, shared=False, seconds=1.0)  # recording keeps a key
    for n in range(10, 12):
        costs.record(f"key-{n}", 1, shared=False, seconds=1.0)
    assert costs.has_baseline("key-7") and not costs.has_baseline("key-8")


def test_idle_work_runs_a_step_at_a_time_and_only_while_no_request_waits():
    order: list[str] = []
    step_started, release = threading.Event(), threading.Event()

    def run_batch(jobs):
        order.append("+".join(j.name for j in jobs))
        return ["ok" for _ in jobs]

    def idle() -> bool:
        order.append(f"idle{sum(o.startswith('idle') for o in order) + 1}")
        step_started.set()
        release.wait(10)
        return order.count("idle3") == 0  # three steps in all

    batcher = Batcher(run_batch, key=lambda j: j.key, max_batch_size=4, max_wait_s=0, adaptive=False, on_idle=idle)

    async def scenario():
        await asyncio.to_thread(step_started.wait, 5)  # the first step holds the GPU thread
        job = batcher.submit(Job("job"))
        release.set()
        await job  # after the step already running, before any other
        for _ in range(500):  # the remaining steps, while nothing is queued
            if "idle3" in order:
                break
            await asyncio.sleep(0.01)

    run(scenario())
    batcher.close()
    assert order == ["idle1", "job", "idle2", "idle3"]


def test_idle_work_that_fails_stops_and_requests_are_still_served():
    calls = []

    def idle() -> bool:
        calls.append(1)
        raise RuntimeError("compile failed")

    batcher = Batcher(lambda jobs: ["ok" for _ in jobs], key=lambda j: j.key, max_batch_size=4, max_wait_s=0,
                      adaptive=False, on_idle=idle)  # fmt: skip

    async def scenario():
        for _ in range(500):  # the idle step runs (and fails) while nothing is queued
            if calls:
                break
            await asyncio.sleep(0.01)
        return await batcher.submit(Job("job"))

    assert run(scenario()) == "ok"
    batcher.close()
    assert calls == [1] and batcher.failure is None


def test_lanes_run_batches_at_the_same_time_and_answer_each_request_once():
    from batching import Lane

    both_running = threading.Barrier(2, timeout=5)
    ran: dict[str, list[str]] = {"gpu0": [], "gpu1": []}

    def lane(name):
        def run_batch(jobs):
            if jobs[0].name in ("a", "b"):
                both_running.wait()  # each lane holds one of the first two batches: only concurrency passes
            ran[name].extend(j.name for j in jobs)
            return [f"{name}:{j.name}" for j in jobs]

        return Lane(run_batch)

    batcher = Batcher(None, key=lambda j: j.name, max_batch_size=1, max_wait_s=0, adaptive=False,
                      lanes=[lane("gpu0"), lane("gpu1")])  # fmt: skip

    async def scenario():
        return await asyncio.gather(*(batcher.submit(Job(n)) for n in "abcdef"))

    results = run(scenario())
    batcher.close(5)
    assert sorted(r.split(":")[1] for r in results) == list("abcdef")
    assert ran["gpu0"] and ran["gpu1"] and sorted(ran["gpu0"] + ran["gpu1"]) == list("abcdef")


def test_a_lane_whose_gpu_breaks_retires_the_whole_worker_once():
    from batching import Lane, WorkerBroken

    class GpuGone(RuntimeError):
        pass

    healthy_gate = threading.Event()
    failures: list[WorkerBroken] = []

    def broken(jobs):
        raise GpuGone("an illegal memory access was encountered")

    def healthy(jobs):
        healthy_gate.wait(5)
        return [f"ok:{j.name}" for j in jobs]

    batcher = Batcher(None, key=lambda j: j.name, max_batch_size=1, max_wait_s=0, adaptive=False,
                      is_fatal=lambda e: isinstance(e, GpuGone), on_failure=failures.append,
                      lanes=[Lane(healthy), Lane(broken)])  # fmt: skip

    async def scenario():
        futures = [batcher.submit(Job(n)) for n in "abcd"]
        await asyncio.sleep(0.5)
        healthy_gate.set()
        return await asyncio.gather(*futures, return_exceptions=True)

    results = run(scenario())
    later = run(_submit_after(batcher))
    batcher.close(5)
    assert len(results) == 4 and len(failures) == 1
    assert any(isinstance(r, WorkerBroken) for r in results)
    assert all(isinstance(r, WorkerBroken) or r.startswith("ok:") for r in results)
    assert isinstance(later, WorkerBroken)


async def _submit_after(batcher):
    try:
        return await batcher.submit(Job("late"))
    except Exception as error:  # noqa: BLE001 - the error is the answer
        return error


def test_a_lane_that_cannot_load_its_model_retires_the_worker():
    from batching import Lane, WorkerBroken

    def cannot_load():
        raise RuntimeError("CUDA out of memory on GPU 1")

    batcher = Batcher(None, key=lambda j: j.name, max_batch_size=1, max_wait_s=0, adaptive=False,
                      lanes=[Lane(lambda jobs: ["ok"] * len(jobs)), Lane(lambda jobs: [], on_start=cannot_load)])  # fmt: skip
    result = run(_submit_after(batcher))
    batcher.close(5)
    assert isinstance(batcher.failure, WorkerBroken) and "GPU 1" in str(batcher.failure)
    assert result == "ok" or isinstance(result, WorkerBroken)


def test_batch_limit_caps_each_keys_batches_and_a_limit_of_one_runs_at_once_alone():
    """The service's `batch_limit`: 1 for shapes where batching cannot pay (they run at once,
    alone, with nothing to wait for or try), more for small ones."""
    engine = FakeEngine()
    limits = {"large": 1, "small": 2, "blocker": 1}
    batcher = Batcher(engine, key=lambda j: j.key, max_batch_size=4, max_wait_s=60, adaptive=False,
                      batch_limit=lambda job: limits.get(job.key, 4))  # fmt: skip

    async def scenario():
        blocker = await hold_gpu(batcher, engine)
        futures = [batcher.submit(Job(f"{key}{i}", key=key)) for i in range(3) for key in ("large", "small")]
        engine.gate.set()
        await blocker
        await asyncio.gather(*futures[:-1])  # the last small one waits for a partner for 60 s: not awaited
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit(Job("large9", key="large"))  # a large job alone waits for nobody
        return loop.time() - start

    waited = run(scenario())
    assert waited < 5
    assert [b for b in engine.batches[1:] if b[0].startswith("large")] == [["large0"], ["large1"], ["large2"], ["large9"]]
    assert ["small0", "small1"] in engine.batches
    batcher.close(timeout=0)
