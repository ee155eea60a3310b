"""GPU_PARALLELISM=replicas (REPLICA_PROCESSES=true, the default): the replicas on GPUs 1..
each run in a process of their own (false: on threads of the worker's process).

Replicas as threads of one process share its interpreter, and the host work of every GPU
waits its turn there: on four H200s the forwards ran 18% slower than alone and 8 queued jobs
ran at x2.77 of one GPU, against x3.51 in processes; on two GPUs both gave x1.84-1.85
(BENCHMARKS.md). So the worker's own process keeps the RunPod loop, the batcher and the
replica on the first GPU; each further GPU gets a process that loads the same model there
(from the same files: the page cache serves them once the first has read them), compiles
and warms it up as the worker does, and then runs the batches its batcher lane sends it.

Each job's prompt is encoded as the job is accepted, beside the batches under way, by one
GPU's text encoder in turn, the worker's on the first GPU or a process's
(`ReplicaProcess.encode_ahead`); the embeddings cross the pipe in host memory (a few MB a
prompt) and serve a batch on any GPU. Encoded by the process when its batch started instead,
they cost 230 ms a job on two H200s (0.650 images/s against 0.703 with threads); encoded all
by the first GPU beside its own batches, the first round on four H200s started up to 2.5 s
late (BENCHMARKS.md).

One pipe per process carries:
- to it: `("batch", requests)` (the images, seeds, prompt embeddings and LoRA files of a
  batch; the LoRA files are on the disk both share, held by the worker until the job is
  answered), `("encode", token, request)`, `("loras", loras)` (prepare the endpoint's
  LoRAs) and `("stop", None)`;
- from it: `("ready", encodes_ahead)` or `("failed", sentence)` once at start; for each batch,
  `("progress", index, step, total)` as its steps end and one `("done", results)` or
  `("error", kind, sentence)` (kind "input": the batch's input, its LoRAs, is at fault, and
  the sentence is the job's answer, as on the first GPU); for each encode, `("encoded", token, embeddings)` or
  `("encode_failed", token, sentence)` once ready, between the others.
A thread at each end reads the pipe, so that an encode is taken and answered while a batch runs.

A process that stops (killed, out of host memory, a crash in a library) makes the batch it
runs, and every later one, fail with `ReplicaLost`, which retires the worker (`service`):
every job it holds is answered once. A GPU error inside a process (not out-of-memory) is
reported as `ReplicaLost` too: that process's CUDA context is unusable, so it exits.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from concurrent.futures import Future
from typing import Callable, Sequence

import torch

from config import Settings
from qwen_edit_worker.engine import compilation, devices
from qwen_edit_worker.engine.edit_engine import EditEngine, EditRequest
from qwen_edit_worker.engine.side_stream import SideStream
from qwen_edit_worker.errors import InputError

log = logging.getLogger("qwen_edit_worker.replicas")


class ReplicaLost(RuntimeError):
    """A replica's process stopped, or its GPU failed: it can run no more batches."""


class ReplicaProcess:
    """Replica `replica` on `device`, in a process it starts at once. Its batch calls come from
    one thread at a time (its batcher lane's); `encode_ahead` from any thread."""

    def __init__(self, settings: Settings, device: torch.device, replica: int):
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, theirs = spawn.Pipe()
        self.name = f"replica-{replica}"
        self.process = spawn.Process(target=_serve, args=(settings, str(device), replica, theirs), name=self.name)
        self.process.start()
        theirs.close()  # ours alone now: when the process ends, reading sees the end at once
        self._lock = threading.Lock()  # one batch (or LoRA preparation) at a time
        self._send_lock = threading.Lock()
        self._replies: queue.Queue = queue.Queue()  # for the batch calls; None once the process has ended
        self._encodes: dict[int, Future] = {}  # asked for, not yet answered
        self._tokens = itertools.count()
        self._encodes_ahead = False
        self.ready = threading.Event()  # set by its lane once it takes jobs (after the endpoint's LoRAs)
        self.batches = 0  # batches it has run
        self._ended = threading.Event()  # the process has ended and been reaped (by the pipe's reader alone:
        # `Process.join` from two threads at once lets one see the other's reaped process as alive)
        threading.Thread(target=self._read, name=f"{self.name}-pipe", daemon=True).start()

    def wait_ready(self) -> None:
        """Until the process has loaded, compiled and warmed up its model; a start that fails
        raises with its sentence."""
        kind, detail = self._receive()
        if kind == "failed":
            raise RuntimeError(detail)
        self._encodes_ahead = detail
        log.info("%s ready (process %d)", self.name, self.process.pid)

    def encode_ahead(self, request: EditRequest) -> EditRequest:
        """`request` with its prompt embeddings under way in the process (`EditEngine.encode_ahead`),
        host tensors once ready; unchanged where the process's model offloads."""
        if not self._encodes_ahead:
            return request
        future: Future = Future()
        with self._send_lock:
            token = next(self._tokens)
            self._encodes[token] = future
        try:
            self._send(("encode", token, _bare(request, prompts=None)))
        except ReplicaLost as lost:
            if self._encodes.pop(token, None) is not None:  # else the reader has failed it already
                future.set_exception(lost)
        return dataclasses.replace(request, prompts=future)

    def run_batch(self, requests: Sequence[EditRequest]) -> list:
        """The batch's results from the process; each request's `progress` is called here."""
        sent = [_bare(request, prompts=_on_host(request.prompts)) for request in requests]
        with self._lock:
            self._send(("batch", sent))
            while True:
                kind, *rest = self._receive()
                if kind == "progress":
                    index, step, total = rest
                    if requests[index].progress is not None:
                        requests[index].progress(step, total)
                elif kind == "done":
                    self.batches += 1
                    return rest[0]
                else:
                    raise _error(self.name, *rest)

    def prepare_loras(self, loras: tuple) -> None:
        """Load (or swap in) `loras` there, as a batch with them would."""
        with self._lock:
            self._send(("loras", loras))
            kind, *rest = self._receive()
            if kind != "done":
                raise _error(self.name, *rest)

    def stop(self, timeout: float = 10) -> None:
        """Let the process leave its loop, then end it if it does not."""
        try:
            self._send(("stop", None))
        except ReplicaLost:
            pass  # it has stopped already
        if not self._ended.wait(timeout):
            self.process.kill()  # it ignores SIGTERM
            self._ended.wait(timeout)

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:
            raise self._lost() from None

    def _read(self) -> None:
        """The pipe's reader: embeddings to the futures waiting for them, the rest to the batch
        calls; once the process has ended, `ReplicaLost` to everything still waiting."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind, *rest = message
            if kind in ("encoded", "encode_failed"):
                token, result = rest
                future = self._encodes.pop(token)
                if kind == "encoded":
                    future.set_result(result)
                else:
                    future.set_exception(RuntimeError(f"{self.name}: {result}"))
            else:
                self._replies.put(message)
        self.process.join()
        self._ended.set()
        lost = self._lost()
        with self._send_lock:
            waiting, self._encodes = list(self._encodes.values()), {}
        for future in waiting:
            future.set_exception(lost)
        self._replies.put(None)

    def _receive(self) -> tuple:
        """The next reply; `ReplicaLost` once the process has ended and said everything."""
        message = self._replies.get()
        if message is None:
            self._replies.put(None)  # for every later call too
            raise self._lost()
        return message

    def _lost(self) -> ReplicaLost:
        how = f" (exit code {self.process.exitcode})" if self._ended.wait(5) else " answering"
        return ReplicaLost(f"{self.name} of the GPU processes stopped{how}")


def _bare(request: EditRequest, prompts: tuple | None) -> EditRequest:
    """What of `request` crosses to a process: not its progress callback (called on this side),
    its prompt embeddings only as host tensors."""
    return dataclasses.replace(request, progress=None, prompts=prompts)


def _on_host(prompts: Future | None) -> tuple | None:
    """The embeddings made ahead (`EditEngine.encode_ahead`), once ready, in host memory."""
    if prompts is None:
        return None
    return tuple(t if t is None else t.cpu() for t in SideStream.take(prompts))


def _made(prompts: tuple | None) -> Future | None:
    """Embeddings that came with a batch, as the engine takes embeddings made ahead."""
    if prompts is None:
        return None
    future: Future = Future()
    future.set_result(prompts)
    return future


def _error(name: str, kind: str, sentence: str) -> Exception:
    """What a batch's failure in the process is here: out of memory lets the batcher split the
    batch; a broken GPU retires the worker; anything else fails the batch's jobs alone."""
    if kind == "oom":
        return torch.OutOfMemoryError(sentence)
    if kind == "input":
        return InputError(sentence)
    if kind == "fatal":
        return ReplicaLost(f"{name}'s GPU failed: {sentence}")
    return RuntimeError(f"{name}: {sentence}")


def _serve(settings: Settings, device: str, replica: int, conn) -> None:
    """A replica process's life: load and warm up the model, then run what the worker sends
    until it says stop or goes away."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s replica {replica} %(name)s: %(message)s")
    # A SIGTERM sent to the whole process group must not cut a batch short: the worker drains
    # its jobs, then says stop (or goes away, which ends the loop below).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from model_loader import ModelHolder

    where = torch.device(device)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    engine: EditEngine | None = None
    holder = ModelHolder(settings, where, replica, compile_ahead=lambda model: engine.compile_ahead(model))
    engine = EditEngine(settings, holder.get)
    try:
        model = holder.get()
        compilation.warm_up(model, engine.warm_up)
        engine.want_batch_graphs()  # the worker decides which jobs batch: this process compiles for them while idle
        engine.start_serving(model)
    except Exception as error:  # noqa: BLE001 - one sentence to the worker, the details here
        log.exception("replica %d could not start", replica)
        conn.send(("failed", f"replica {replica} on {device} could not start: {compilation.first_line(error)}"))
        return
    pipe = _ChildPipe(conn, engine)
    pipe.send(("ready", engine.encodes_ahead()))
    idle_work = model.compiled  # the LoRA slots' and batches' graphs, while nothing waits (as on one GPU)
    while True:
        if idle_work and pipe.inbox.empty():
            idle_work = engine.warming_up and compilation.compile_step(model, engine.warm_up_idle)
            continue
        kind, payload = pipe.inbox.get()
        if kind == "stop":
            return
        if kind == "loras":
            pipe.answer(lambda: engine.prepare_loras(payload))
        elif kind == "batch":
            for index, request in enumerate(payload):
                payload[index] = dataclasses.replace(request, progress=pipe.progress_of(index), prompts=_made(request.prompts))
            if not pipe.answer(lambda: compilation.run_or_fall_back(model, lambda: engine.run_batch(payload))):
                return  # the GPU is unusable: this process ends, the worker retires


class _ChildPipe:
    """The process's end of the pipe: a thread reads it, starting each encode on the engine's
    side stream at once and queueing the rest (`inbox`) for the process's main thread; the
    encodes' answers and the batches' share the pipe through one lock."""

    def __init__(self, conn, engine: EditEngine):
        self._conn, self._engine = conn, engine
        self._lock = threading.Lock()
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name="pipe", daemon=True).start()

    def send(self, message: tuple) -> None:
        with self._lock:
            self._conn.send(message)

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the worker has gone
                message = ("stop", None)
            if message[0] == "encode":
                self._encode(*message[1:])
            else:
                self.inbox.put(message)
            if message[0] == "stop":
                return

    def _encode(self, token: int, request: EditRequest) -> None:
        try:
            future = self._engine.encode_ahead(request).prompts
        except Exception as error:  # noqa: BLE001 - the job's batch says it
            self.send(("encode_failed", token, compilation.first_line(error)))
            return
        future.add_done_callback(lambda done: self._encoded(token, done))

    def _encoded(self, token: int, done: Future) -> None:
        try:
            self.send(("encoded", token, _on_host(done)))
        except OSError:
            pass  # the worker has gone
        except Exception as error:  # noqa: BLE001 - the job's batch says it
            log.exception("a prompt could not be encoded")
            self.send(("encode_failed", token, compilation.first_line(error)))

    def progress_of(self, index: int) -> Callable[[int, int], None]:
        return lambda step, total: self.send(("progress", index, step, total))

    def answer(self, run: Callable[[], object]) -> bool:
        """Send `run()`'s result, or what its failure is; whether this process can go on."""
        try:
            self.send(("done", run()))
            return True
        except torch.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            self.send(("error", "oom", str(error).splitlines()[0][:300]))
            return True
        except InputError as error:  # a LoRA the batch cannot use: its sentence is the answer
            self.send(("error", "input", str(error)))
            return True
        except Exception as error:  # noqa: BLE001 - the worker decides what the job is told
            log.exception("a batch failed")
            fatal = devices.breaks_the_gpu(error)
            self.send(("error", "fatal" if fatal else "failed", compilation.first_line(error)))
            return not fatal
