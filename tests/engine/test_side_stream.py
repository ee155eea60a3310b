"""Side work (prompt encoding ahead) and torch.compile: never at the same time."""

from __future__ import annotations

import threading
import time

import torch

from qwen_edit_worker.engine.side_stream import FENCE, CompileFence, SideStream


def test_a_call_waits_while_a_compile_traces_and_a_compile_waits_for_calls():
    fence = CompileFence()
    events: list[str] = []
    fence.compile_started()
    side = threading.Thread(target=lambda: (fence.calls().__enter__(), events.append("call")))
    side.start()
    time.sleep(0.3)
    events.append("compile ended")
    fence.compile_ended()
    side.join(5)
    assert events == ["compile ended", "call"]

    holder_entered, release = threading.Event(), threading.Event()

    def hold_a_call():
        with fence.calls():
            holder_entered.set()
            release.wait(5)
            events.append("call done")

    holder = threading.Thread(target=hold_a_call)
    holder.start()
    holder_entered.wait(5)
    compiler = threading.Thread(target=lambda: (fence.compile_started(), events.append("compile started")))
    compiler.start()
    time.sleep(0.3)
    release.set()
    holder.join(5)
    compiler.join(5)
    assert events[-2:] == ["call done", "compile started"]


def test_the_fence_sees_real_compiles_even_after_a_dynamo_reset():
    torch._dynamo.reset()  # what the fall-back to eager does: it drops every compile hook
    side = SideStream("test-side")
    assert side.submit(lambda: threading.current_thread().name, device=torch.device("cpu")).result(5).startswith("test-side")
    before = FENCE.compiles
    torch.compile(lambda x: torch.sin(x) * 2, backend="eager")(torch.ones(3))
    assert FENCE.compiles == before + 1


def test_side_work_that_compiles_does_not_wait_for_itself():
    side = SideStream("test-compiling-side")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.cos(x) + 1, backend="eager")
    result = side.submit(lambda: compiled(torch.zeros(2)), device=torch.device("cpu")).result(20)
    assert torch.equal(result, torch.full((2,), 2.0))
