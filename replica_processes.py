"""GPU_PARALLELISM=replicas with REPLICA_PROCESSES=true: the replicas on GPUs 1.. each run
in a process of their own (the default runs them on threads of the worker's process).

Replicas as threads of one process share its interpreter, and the host work of every GPU
waits its turn there: on four H200s, three of the first four jobs waited 1.1-2.3 s for
prompt embeddings that take 75 ms on one GPU, and the forwards ran up to 20% slower
(BENCHMARKS.md). So the worker's own process keeps the RunPod loop, the batcher and the
replica on the first GPU; each further GPU gets a process that loads the same model there
(from the same files: the page cache serves them once the first has read them), compiles
and warms it up as the worker does, and then runs the batches its batcher lane sends it.

One pipe per process carries, in order:
- to it: `("batch", requests)` (the images, seeds and LoRA files of a batch; the LoRA files
  are on the disk both share, held by the worker until the job is answered),
  `("loras", loras)` (prepare the endpoint's LoRAs) and `("stop", None)`;
- from it: `("ready", None)` or `("failed", sentence)` once at start, then for each batch
  `("progress", index, step, total)` as its steps end and one `("done", results)` or
  `("error", kind, sentence)`.

Prompts are encoded in the process that runs the batch, when the batch starts: not ahead,
beside the batch before it, as threads do (that encoding is what waited longest in one
interpreter). On two H200s this cost more than the shared interpreter did: 0.650 images/s
against 0.703 with threads (BENCHMARKS.md), hence not the default; four or more GPUs,
where threads reached x2.52 of one, were not measured.

A process that stops (killed, out of host memory, a crash in a library) makes the batch it
runs, and every later one, fail with `ReplicaLost`, which retires the worker (`service`):
every job it holds is answered once. A GPU error inside a process (not out-of-memory) is
reported as `ReplicaLost` too: that process's CUDA context is unusable, so it exits.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
from typing import Callable, Sequence

import torch

import compilation
import devices
from config import Settings

log = logging.getLogger("qwen_edit_worker.replicas")


class ReplicaLost(RuntimeError):
    """A replica's process stopped, or its GPU failed: it can run no more batches."""


class ReplicaProcess:
    """Replica `replica` on `device`, in a process it starts at once. Its methods are called
    from one thread at a time (its batcher lane's)."""

    def __init__(self, settings: Settings, device: torch.device, replica: int):
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, theirs = spawn.Pipe()
        self.name = f"replica-{replica}"
        self.process = spawn.Process(target=_serve, args=(settings, str(device), replica, theirs), name=self.name)
        self.process.start()
        theirs.close()  # ours alone now: when the process ends, reading sees the end at once
        self._lock = threading.Lock()
        self.ready = threading.Event()  # set by its lane once it takes jobs (after the endpoint's LoRAs)
        self.batches = 0  # batches it has run

    def wait_ready(self) -> None:
        """Until the process has loaded, compiled and warmed up its model; a start that fails
        raises with its sentence."""
        kind, *rest = self._receive()
        if kind == "failed":
            raise RuntimeError(rest[0])
        log.info("%s ready (process %d)", self.name, self.process.pid)

    def run_batch(self, requests: Sequence) -> list:
        """The batch's results from the process; each request's `progress` is called here."""
        # What cannot cross a process: the progress callbacks (called here instead) and the
        # prompt embeddings made ahead (the process encodes its own).
        sent = [dataclasses.replace(request, progress=None, prompts=None) for request in requests]
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
            self._conn.send(("stop", None))
        except OSError:
            pass  # it has stopped already
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()  # it ignores SIGTERM
            self.process.join(timeout)

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:
            raise self._lost() from None

    def _receive(self) -> tuple:
        """The next message; `ReplicaLost` once the process has ended and said everything."""
        multiprocessing.connection.wait([self._conn, self.process.sentinel])
        try:
            if self._conn.poll():
                return self._conn.recv()
        except (EOFError, OSError):
            pass
        raise self._lost()

    def _lost(self) -> ReplicaLost:
        self.process.join(5)
        return ReplicaLost(f"{self.name} of the GPU processes stopped (exit code {self.process.exitcode})")


def _error(name: str, kind: str, sentence: str) -> Exception:
    """What a batch's failure in the process is here: out of memory lets the batcher split the
    batch; a broken GPU retires the worker; anything else fails the batch's jobs alone."""
    if kind == "oom":
        return torch.OutOfMemoryError(sentence)
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
    from engine import EditEngine
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
    except Exception as error:  # noqa: BLE001 - one sentence to the worker, the details here
        log.exception("replica %d could not start", replica)
        conn.send(("failed", f"replica {replica} on {device} could not start: {compilation.first_line(error)}"))
        return
    conn.send(("ready", None))
    idle_work = model.compiled  # the LoRA slots' and batches' graphs, while nothing waits (as on one GPU)
    while True:
        if idle_work and not conn.poll():
            idle_work = engine.warming_up and compilation.compile_step(model, engine.warm_up_idle)
            continue
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the worker has gone
            return
        if kind == "stop":
            return
        if kind == "loras":
            _answer(conn, lambda: engine.prepare_loras(payload))
        elif kind == "batch":
            for index, request in enumerate(payload):
                payload[index] = dataclasses.replace(request, progress=_progress_to(conn, index))
            if not _answer(conn, lambda: compilation.run_or_fall_back(model, lambda: engine.run_batch(payload))):
                return  # the GPU is unusable: this process ends, the worker retires


def _progress_to(conn, index: int) -> Callable[[int, int], None]:
    return lambda step, total: conn.send(("progress", index, step, total))


def _answer(conn, run: Callable[[], object]) -> bool:
    """Send `run()`'s result, or what its failure is; whether this process can go on."""
    try:
        conn.send(("done", run()))
        return True
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        conn.send(("error", "oom", str(error).splitlines()[0][:300]))
        return True
    except Exception as error:  # noqa: BLE001 - the worker decides what the job is told
        log.exception("a batch failed")
        fatal = devices.breaks_the_gpu(error)
        conn.send(("error", "fatal" if fatal else "failed", compilation.first_line(error)))
        return not fatal
