"""Dynamic batching of edit requests onto GPU threads (one per GPU lane).

Semantics (the contract the handler and the tests rely on):

- `submit(request, size)` returns an awaitable for that request's own result or error.
  `size` is how many GPU batch slots the request fills (its number of output images).
- Requests are grouped by `key(request)`; only requests with equal keys share a batch.
- A group is *ready* when its slots reach its target size or its oldest request has
  waited `max_wait_s`. Of the ready groups, the one whose oldest request arrived first
  runs next, so no key starves. A batch takes requests of its key in arrival order while
  they fit; a single request larger than `max_batch_size` runs alone.
- `batch_limit(request)`, if given, caps the target of the group whose oldest request is
  `request` (the service: 1 for shapes where batching cannot pay, or whose batch graphs are
  not compiled yet). A group whose target is 1 runs its oldest request at once, alone.
- The target size is `max_batch_size` unless measurement says otherwise (`adaptive`):
  `CostModel` keeps, per key and batch size, the measured time per image of batches that
  several requests shared (their text is padded and masked, which costs) and of single
  requests. A shared batch of n slots is neither formed nor waited for once it has
  measured slower per image than a smaller batch or a request alone, nor are larger
  ones; so batching never makes a key slower than running its requests one at a time.
  Costs are the minimum of recent measurements, and the first batch of each (key, size)
  is not counted: both keep compilation and autotuning out of them. Until a key has
  requests measured alone, its oldest request runs alone, so that there is something to
  compare with; after a size measures slower, half of it is tried next. A banned size is
  tried again after `reprobe_after` batches of its key, in case the costs have changed.
  What is learnt is kept for the `max_keys` (256) most recently run keys.
- Each lane (`Lane`: a GPU and its `run_batch`) has one thread, which runs one batch at a
  time; with several lanes, each ready batch goes to the next lane that is free. A
  `Batcher(run_batch=...)` has one lane. The event loop never waits on them.
- A batch that raises is retried one request at a time, so only the guilty request gets
  the error; a batch that runs out of GPU memory is split in halves and retried. An error
  that `is_shared` says comes from what the batch's requests share (their key: the worker's
  LoRAs) is every request's answer at once: alone, each would only pay for it again.
- A request whose awaitable was cancelled while queued never reaches the GPU; one
  cancelled while its batch runs is simply not answered, the others are.
- Every submitted request is answered exactly once (result, error, or cancellation).
- `on_idle`, if given, runs on its lane's thread, one step at a time, only while no request
  is queued: work that can wait (compiling shapes no job has asked for yet) never delays a
  job by more than the one step already running. It returns whether more steps remain; once
  it says none, it is asked again after the lane's next batch (which may have brought some);
  one that raises stops the idle work for good.
- A broken worker fails fast: if any lane's `on_start` (model loading) raises, or a batch
  raises an error that `is_fatal` says leaves the process unusable (a CUDA error), every
  queued, running-elsewhere-and-finishing and later request gets that error at once,
  `failure` holds it, and `on_failure` is called once so the worker can be replaced.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

log = logging.getLogger("qwen_edit_worker.batching")

Req = TypeVar("Req")
Res = TypeVar("Res")
RunBatch = Callable[[Sequence[Req]], Sequence[Res]]


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


class WorkerBroken(RuntimeError):
    """The model could not load, or the GPU is in a state no request can succeed in."""


class CostModel:
    """Measured seconds per image, per (key, batch slots, shared by several requests).

    A cost is the minimum of the last `window` measurements: compilation, autotuning and
    other one-off stalls only ever add time, so the minimum is what the shape costs. The
    first batch of each shape is not counted at all, and a key has a baseline once
    `baseline_samples` requests have been measured alone.
    """

    def __init__(self, window: int = 8, baseline_samples: int = 2, reprobe_after: int = 200, max_keys: int = 256):
        self.window = window
        self.baseline_samples = baseline_samples
        self.reprobe_after = reprobe_after
        self.max_keys = max_keys
        self._samples: dict[Hashable, dict[tuple[int, bool], deque[float]]] = {}
        self._seen: dict[Hashable, set[tuple[int, bool]]] = {}
        self._measured_at: dict[tuple[Hashable, int], int] = {}
        self._batches: dict[Hashable, int] = {}
        self._recent: OrderedDict[Hashable, None] = OrderedDict()  # keys, least recently recorded first

    def record(self, key: Hashable, slots: int, shared: bool, seconds: float) -> None:
        self._touch(key)
        seen = self._seen.setdefault(key, set())
        if (slots, shared) not in seen:
            # The first batch of a shape pays for compilation and kernel autotuning: not a cost.
            seen.add((slots, shared))
            return
        table = self._samples.setdefault(key, {})
        table.setdefault((slots, shared), deque(maxlen=self.window)).append(seconds / slots)
        self._batches[key] = self._batches.get(key, 0) + 1
        if shared:
            self._measured_at[(key, slots)] = self._batches[key]

    def _touch(self, key: Hashable) -> None:
        """Keep what was learnt for the `max_keys` most recently recorded keys only: keys
        hold sizes and, with some attention backends, prompts, so they are unbounded."""
        self._recent[key] = None
        self._recent.move_to_end(key)
        while len(self._recent) > self.max_keys:
            old, _ = self._recent.popitem(last=False)
            self._samples.pop(old, None)
            self._seen.pop(old, None)
            self._batches.pop(old, None)
            for measured in [k for k in self._measured_at if k[0] == old]:
                del self._measured_at[measured]

    @property
    def keys(self) -> int:
        return len(self._recent)

    def per_image(self, key: Hashable, slots: int, shared: bool) -> float | None:
        samples = self._samples.get(key, {}).get((slots, shared))
        return min(samples) if samples else None

    def has_baseline(self, key: Hashable) -> bool:
        """Has a request of this key been measured alone often enough (the cost batching must beat)?"""
        return any(
            not shared and len(samples) >= self.baseline_samples
            for (_, shared), samples in self._samples.get(key, {}).items()
        )

    def allows(self, key: Hashable, slots: int) -> bool:
        """May several requests share a batch of `slots` images?"""
        mine = self.per_image(key, slots, shared=True)
        if slots <= 1 or mine is None:
            return True
        if self._batches.get(key, 0) - self._measured_at.get((key, slots), 0) >= self.reprobe_after:
            return True  # measured long ago: try again
        rivals = [
            min(samples)
            for (n, shared), samples in self._samples[key].items()
            if n < slots or (not shared and n <= slots)
        ]
        return not rivals or mine <= min(rivals)

    def target(self, key: Hashable, limit: int) -> int:
        """The largest shared batch worth waiting for (1 when batching measured slower).

        Sizes at and above the smallest one that measured slower are not tried: per-image
        cost does not fall again with size once the GPU is saturated and the text mask is
        paid for. Below it, the largest size measured no slower is the target; if none is
        measured yet, half the banned size is tried next, so a key settles in a few batches.
        """
        banned = next((n for n in range(2, limit + 1) if not self.allows(key, n)), None)
        if banned is None:
            return limit
        measured = [n for n in range(2, banned) if self.per_image(key, n, shared=True) is not None]
        return max(measured) if measured else max(1, banned // 2)


@dataclass(frozen=True)
class Lane:
    """One GPU's share of the work: how to run a batch there, what to do before the first
    (load the model), and what to do while nothing is queued."""

    run_batch: RunBatch
    on_start: Callable[[], Any] | None = None
    on_idle: Callable[[], bool] | None = None


@dataclass
class _Item(Generic[Req]):
    request: Req
    key: Hashable
    size: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


class Batcher(Generic[Req, Res]):
    def __init__(
        self,
        run_batch: RunBatch | None,
        key: Callable[[Req], Hashable],
        max_batch_size: int,
        max_wait_s: float,
        is_out_of_memory: Callable[[BaseException], bool] = lambda error: False,
        on_start: Callable[[], Any] | None = None,
        is_fatal: Callable[[BaseException], bool] = lambda error: False,
        on_failure: Callable[[WorkerBroken], Any] | None = None,
        on_idle: Callable[[], bool] | None = None,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        lanes: Sequence[Lane] = (),
        is_shared: Callable[[BaseException], bool] = lambda error: False,
        batch_limit: Callable[[Req], int] | None = None,
    ):
        """`run_batch`, `on_start` and `on_idle` make the one lane; or give `lanes` instead."""
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_s >= 0")
        if bool(lanes) == (run_batch is not None):
            raise ValueError("give either run_batch or lanes")
        self.lanes = tuple(lanes) or (Lane(run_batch, on_start, on_idle),)
        self._idle = [lane.on_idle for lane in self.lanes]  # None while a lane has no idle work (until its next batch)
        self._idle_failed: set[int] = set()  # lanes whose idle work raised: never asked again
        self._key = key
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._is_oom = is_out_of_memory
        self._is_fatal = is_fatal
        self._is_shared = is_shared
        self._batch_limit = batch_limit
        self._on_failure = on_failure
        self.failure: WorkerBroken | None = None
        self._clock = clock
        self.costs: CostModel | None = CostModel() if adaptive else None
        self._pending: list[_Item] = []
        self._cond = threading.Condition()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._loop, args=(n,), name=f"gpu-batcher-{n}" if n else "gpu-batcher", daemon=True)
            for n in range(len(self.lanes))
        ]
        for thread in self._threads:
            thread.start()

    # ----------------------------------------------------------------- event-loop side

    def submit(self, request: Req, size: int = 1) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        item = _Item(request, self._key(request), size, loop.create_future(), loop, self._clock())
        with self._cond:
            if self.failure is not None:
                item.future.set_exception(self.failure)
                return item.future
            if self._closing:
                raise BatcherClosed("the worker is shutting down and takes no new jobs")
            self._pending.append(item)
            self._cond.notify()
        return item.future

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish every queued and running one, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    # ------------------------------------------------------------------- GPU thread

    def _loop(self, lane: int) -> None:
        on_start = self.lanes[lane].on_start
        if on_start is not None:
            try:
                on_start()
            except Exception as error:
                log.exception("start-up failed")
                self._fail(WorkerBroken(f"the model failed to load: {error}"))
                return
        while self.failure is None:
            batch = self._next_batch(lane)
            if batch is None:
                return
            self._run(batch, lane)
            if lane not in self._idle_failed:
                self._idle[lane] = self.lanes[lane].on_idle  # a batch can bring idle work (graphs its shape wants)

    def _fail(self, failure: WorkerBroken, batch: Sequence[_Item] = ()) -> None:
        """Answer the batch and everything queued with the worker's failure (the first one,
        if another lane failed before); refuse all that follows."""
        with self._cond:
            first = self.failure is None
            if first:
                self.failure = failure
            doomed, self._pending = [*batch, *self._pending], []
            self._cond.notify_all()
        for item in doomed:
            _resolve(item, error=self.failure)
        log.error("worker broken, %d requests answered with the error: %s", len(doomed), self.failure)
        if first and self._on_failure is not None:
            self._on_failure(failure)

    def _next_batch(self, lane: int) -> list[_Item] | None:
        while True:
            with self._cond:
                if self.failure is not None:
                    return None
                self._pending = [item for item in self._pending if not item.cancelled]
                if not self._pending:
                    if self._closing:
                        return None
                    if self._idle[lane] is None:
                        self._cond.wait()
                        continue
                else:
                    batch, wait = self._ready_batch(self._clock())
                    if batch:
                        taken = {id(item) for item in batch}
                        self._pending = [item for item in self._pending if id(item) not in taken]
                        return batch
                    self._cond.wait(timeout=wait)
                    continue
            self._idle_step(lane)  # outside the lock: requests keep arriving meanwhile

    def _idle_step(self, lane: int) -> None:
        try:
            more = self._idle[lane]()
        except Exception:  # noqa: BLE001 - idle work is optional; jobs must not pay for it
            log.exception("idle work failed; stopping it")
            self._idle_failed.add(lane)
            more = False
        if not more:
            self._idle[lane] = None

    def _ready_batch(self, now: float) -> tuple[list[_Item], float]:
        """The batch to run now, or none and how long until one could be ready."""
        groups: dict[Hashable, list[_Item]] = {}
        for item in self._pending:  # arrival order, so each group's head is its oldest
            groups.setdefault(item.key, []).append(item)
        soonest = float("inf")
        for members in sorted(groups.values(), key=lambda g: g[0].arrived):
            target = self._target(members[0])
            batch = self._fill(members, target)
            deadline = members[0].arrived + self.max_wait_s
            if self._closing or sum(i.size for i in batch) >= target or now >= deadline:
                return batch, 0.0
            soonest = min(soonest, deadline - now)
        return [], soonest

    def _target(self, head: _Item) -> int:
        """The batch size to fill for `head`'s key: at most `batch_limit(head's request)`, and
        no size measured slower than smaller ones (`CostModel.target`)."""
        limit = self.max_batch_size
        if self._batch_limit is not None:
            limit = max(1, min(limit, self._batch_limit(head.request)))
        return self.costs.target(head.key, limit) if self.costs else limit

    def _fill(self, members: list[_Item], target: int) -> list[_Item]:
        if target == 1 or (self.costs is not None and not self.costs.has_baseline(members[0].key)):
            return members[:1]  # alone; or measure a request alone first: the baseline batches must beat
        batch, used = [], 0
        for item in members:
            if batch and used + item.size > target:
                break
            batch.append(item)
            used += item.size
        # Never form a shared batch whose size measured slower than smaller ones.
        while len(batch) > 1 and self.costs and not self.costs.allows(batch[0].key, used):
            used -= batch.pop().size
        return batch

    def _run(self, batch: list[_Item], lane: int) -> None:
        live = [item for item in batch if not item.cancelled]
        if not live:
            return
        if self.failure is not None:  # broken during an earlier part of a retry
            for item in live:
                _resolve(item, error=self.failure)
            return
        slots = sum(item.size for item in live)
        try:
            start = time.perf_counter()
            results = self.lanes[lane].run_batch([item.request for item in live])
            elapsed = time.perf_counter() - start
        except Exception as error:
            if self._is_fatal(error):
                self._fail(WorkerBroken(f"the GPU failed and this worker must be replaced: {error}"), live)
            else:
                self._recover(live, error, lane)
            return
        if self.costs is not None:
            with self._cond:  # lanes record from their own threads; batches are formed under the lock too
                self.costs.record(live[0].key, slots, len(live) > 1, elapsed)
        log.info("batch of %d requests (%d images, key %s) ran in %.0f ms (%.0f ms per image)%s",
                 len(live), slots, live[0].key, elapsed * 1000, elapsed * 1000 / slots,
                 f" on lane {lane}" if len(self.lanes) > 1 else "")  # fmt: skip
        for item, result in zip(live, results, strict=True):
            _resolve(item, result=result)

    def _recover(self, batch: list[_Item], error: Exception, lane: int) -> None:
        if len(batch) == 1 or self._is_shared(error):
            log.warning("%s failed: %s: %s", f"batch of {len(batch)}" if len(batch) > 1 else "request",
                        type(error).__name__, error)  # fmt: skip
            for item in batch:
                _resolve(item, error=error)
        elif self._is_oom(error):
            half = len(batch) // 2
            log.warning("batch of %d ran out of GPU memory: retrying as %d + %d", len(batch), half, len(batch) - half)
            self._run(batch[:half], lane)
            self._run(batch[half:], lane)
        else:
            log.warning("batch of %d failed (%s): retrying its requests one at a time", len(batch), error)
            for item in batch:
                self._run([item], lane)


def _resolve(item: _Item, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if item.future.done():  # cancelled meanwhile: nobody is waiting
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)

    try:
        item.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: its awaiting task is gone
        log.warning("result dropped: the event loop that asked for it has closed")
