"""Work that runs beside the GPU thread: its own thread and, on a GPU, its own CUDA stream.

The text encoder's forward is host-bound at real size: about 130 ms of a job's 223 ms encode
stage on an H200, most of it Python and launch overhead of the vision tower's per-window
attention calls and the 28 decoder layers, while the GPU does little (`gpu_speed.py --stages`).
Run on the GPU thread, that time is lost to the transformer. Run here, as soon as a job is
accepted, it overlaps with the transformer of the jobs ahead of it.

Results cross streams safely: the side thread waits for its stream before handing a result
over, and `take` marks each tensor as used by the receiving thread's stream, so that the
caching allocator does not give its memory back to the side stream while kernels queued on
the receiving stream still read it.

Side work never runs while torch.compile traces (`CompileFence`): tracing patches
`torch.nn.Module.__call__` for the whole process, so a module called from another thread
meanwhile is routed into the trace. (Seen on the GPU machine: a module called by a second
thread during a compile failed with "Detected that you are using FX to symbolically trace a
dynamo-optimized function".)
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


class CompileFence:
    """Calls that must not overlap a torch.compile trace (`calls()`), and the compiles that
    wait for them: a compile waits for the calls under way, and calls wait while it runs."""

    def __init__(self):
        self._cond = threading.Condition()
        self._calls: dict[int, int] = {}  # calls under way, per thread
        self._compiling = False
        self.compiles = 0

    def install(self) -> None:
        """Hook dynamo's compile start and end, unless hooked: `torch._dynamo.reset()` (the
        fall-back to eager calls it) drops every hook, so side work checks before each call."""
        from torch._dynamo.callback import callback_handler

        with self._cond:
            if self.compile_started not in callback_handler.start_callbacks:
                callback_handler.register_start_callback(self.compile_started)
                callback_handler.register_end_callback(self.compile_ended)

    def compile_started(self, *_: Any) -> None:
        me = threading.get_ident()
        with self._cond:
            self._compiling = True  # first, so that no new call starts while the old ones finish
            # Other threads' calls only: a call that itself compiles must not wait for itself.
            self._cond.wait_for(lambda: not any(n for thread, n in self._calls.items() if thread != me))
            self.compiles += 1

    def compile_ended(self, *_: Any) -> None:
        with self._cond:
            self._compiling = False
            self._cond.notify_all()

    @contextmanager
    def calls(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: not self._compiling)
            self._calls[me] = self._calls.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._calls[me] -= 1
                if not self._calls[me]:
                    del self._calls[me]
                self._cond.notify_all()


FENCE = CompileFence()


class SideStream:
    def __init__(self, name: str):
        self._name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def submit(self, fn: Callable[..., Any], *args: Any, device: torch.device) -> Future:
        """Run `fn(*args)` on the side thread under inference mode (on `device`'s side stream)."""
        FENCE.install()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            return self._pool.submit(self._run, fn, args, device)

    def _run(self, fn: Callable[..., Any], args: tuple, device: torch.device) -> Any:
        with torch.inference_mode(), FENCE.calls():
            if device.type != "cuda":
                return fn(*args)
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                result = fn(*args)
            stream.synchronize()
            return result

    @staticmethod
    def take(future: Future) -> Any:
        """The result (or the error) of `future`, ready for use on this thread's current streams."""
        result = future.result()
        for tensor in _tensors(result):
            if tensor.is_cuda:
                tensor.record_stream(torch.cuda.current_stream(tensor.device))
        return result


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []
