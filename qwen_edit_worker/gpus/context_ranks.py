"""GPU_PARALLELISM=context: one process per GPU, and every transformer forward runs on all of them.

Rank 0 is the worker itself: the RunPod loop, the batcher, the engine, the text encoder and
the VAE. Ranks 1.. are follower processes that it starts. Every rank loads the same pipeline
(`model_loader.load_model`: the same Lightning fuse, fp8 and compile) with its transformer
split across the ranks (`context_parallel`). Before rank 0's transformer runs, it announces
the call: the call's shapes and other arguments go to each follower through a queue (a wait
with no timeout: a worker may idle for hours between jobs), its tensors by broadcast, and
then every rank runs the same forward, its collectives meeting the others'. Rank 0's
warm-ups are such calls too, so the followers compile in step with it. Changes of the
per-request LoRAs go the same way (`context_parallel.MirroredAdapters`): each follower makes the same change
to its own transformer, from the same LoRA file on the same disk, before the next forward.

A follower that has stopped makes the next forward fail at once (`RankLost`); the worker then
retires and every job it holds is answered once (`service`). One that stops in the middle of
a forward is seen by a watch on its process (`watch`): on NCCL, which does not notice a peer
that is gone, the watch ends the process group, so that rank 0's waiting collective fails
instead of waiting out the group's timeout (gloo notices by itself). A rank that hangs fails
the forward once the process group's timeout (`TIMEOUT`) has passed.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from config import Settings
from qwen_edit_worker.engine import compilation
from qwen_edit_worker.engine.context_parallel import Ranks
from qwen_edit_worker.loras.adapters import AdapterCache
from qwen_edit_worker.startup.model_files import resolve_lora_path, resolve_model_path

log = logging.getLogger("qwen_edit_worker.ranks")

# How long rank 0 waits for the followers to join the group, and any rank for the others in a
# forward's collectives: rank 0's first forward waits while the followers load the model, as
# it has (about as long).
TIMEOUT = timedelta(minutes=10)
# How long a failed collective waits to see a follower stopped: a killed process's sockets are
# closed (and the collective fails) before its parent can see that it has exited.
LOST_GRACE_S = 3.0


class RankLost(RuntimeError):
    """A follower process stopped: no forward can run across the ranks any more."""


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _raised_by_a_collective(error: BaseException) -> bool:
    """Whether `error` came out of a collective: torch.distributed's own errors, one raised
    through torch.distributed's Python, or (from a compiled graph, whose collectives have no
    Python frames) a plain RuntimeError in the words of gloo or NCCL."""
    if isinstance(error, dist.DistError):
        return True
    marker = f"torch{os.sep}distributed{os.sep}"
    if any(marker in frame.filename for frame in traceback.extract_tb(error.__traceback__)):
        return True
    return isinstance(error, RuntimeError) and re.search(r"gloo|nccl|c10d|ProcessGroup", str(error), re.I) is not None


def _join(store: str, rank: int, world: int, device: torch.device, timeout: timedelta) -> Ranks:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(_backend(device), init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)  # fmt: skip
    return Ranks(rank, world, dist.group.WORLD)


class Followers:
    """Ranks 1.. as processes; rank 0 (this process) joins them in `join`."""

    def __init__(self, settings: Settings, devices: list[torch.device]):
        self.settings = settings
        self.devices = devices
        self._store = os.path.join(tempfile.mkdtemp(prefix="qwen-edit-ranks-"), "store")
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._inboxes = [spawn.SimpleQueue() for _ in devices[1:]]
        self._ready = spawn.Queue()  # each follower says when its imports are done
        self.processes = [
            spawn.Process(target=_follow, args=(settings, rank, len(devices), self._store, str(device), inbox, self._ready,
                                                TIMEOUT), name=f"rank-{rank}")  # fmt: skip
            for rank, (device, inbox) in enumerate(zip(devices[1:], self._inboxes), start=1)
        ]  # fmt: skip
        self._ranks: Ranks | None = None
        self._stopping = False
        for process in self.processes:
            process.start()
        log.info("GPU_PARALLELISM=context: %d follower processes started", len(self.processes))

    def join(self) -> Ranks:
        """Rank 0's place in the process group, once every follower has joined it. The model's
        files are fetched first, here, so that the followers (told to go on only then) find
        them on disk instead of downloading them alongside."""
        resolve_model_path(self.settings)
        if self.settings.use_lightning_lora:
            resolve_lora_path(self.settings)
        try:
            self._wait_until_imported()
            for inbox in self._inboxes:
                inbox.put("join")
            ranks = _join(self._store, 0, len(self.devices), self.devices[0], TIMEOUT)
        except Exception as error:  # noqa: BLE001 - one sentence, then the worker stops
            why = str(error).strip()[:300] if isinstance(error, RankLost) or not self.lost() else f"{', '.join(self.lost())} stopped"
            raise RankLost(f"the GPU processes could not form a process group: {why}") from error
        log.info("process group formed: %d ranks (%s)", ranks.size, _backend(self.devices[0]))
        self._ranks = dataclasses.replace(ranks, announce=self.announce, tell=self.tell)
        watch(self.processes, self._lost_while_serving)
        return self._ranks

    def _lost_while_serving(self, names: list[str]) -> None:
        if self._stopping or not dist.is_initialized():
            return
        log.error("%s stopped: ending the process group, the worker retires", ", ".join(names))
        if _backend(self.devices[0]) == "nccl":
            try:
                abort_group()
            except Exception:  # noqa: BLE001 - then the group's timeout ends the wait instead
                log.exception("could not end the process group")

    def _wait_until_imported(self) -> None:
        """Until every follower has imported its libraries (that takes a while, and the group's
        timeout need not cover it); a follower that stops meanwhile fails it at once."""
        waiting = len(self.processes)
        while waiting:
            if lost := self.lost():
                raise RankLost(f"{', '.join(lost)} stopped while starting")
            try:
                self._ready.get(timeout=0.5)
                waiting -= 1
            except queue.Empty:
                pass

    def lost(self) -> list[str]:
        """The followers that have stopped."""
        return [process.name for process in self.processes if not process.is_alive()]

    def check(self) -> None:
        """`RankLost` if a follower has stopped."""
        if lost := self.lost():
            raise RankLost(f"{', '.join(lost)} of the GPU processes stopped")

    def check_after(self, error: BaseException) -> None:
        """`RankLost` if a follower has stopped, after a forward failed with `error`. Where a
        collective raised it, the follower may be gone without being seen stopped yet (the
        kernel closes a killed process's sockets before its exit shows): wait up to
        `LOST_GRACE_S` for it, so that the job and the worker are told a GPU process stopped."""
        if _raised_by_a_collective(error):
            deadline = time.monotonic() + LOST_GRACE_S
            while not self.lost() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.check()

    def announce(self, call: dict | None) -> None:
        """Tell every follower about one forward (None: stop), then send its tensors."""
        tensors = {name: value for name, value in (call or {}).items() if isinstance(value, torch.Tensor)}
        header = None if call is None else {
            "tensors": [(name, tuple(value.shape), value.dtype) for name, value in sorted(tensors.items())],
            "rest": {name: value for name, value in call.items() if name not in tensors},
        }  # fmt: skip
        self.tell("forward" if call is not None else "stop", header)
        for name in sorted(tensors):
            dist.broadcast(tensors[name].contiguous(), src=0, group=self._ranks.group)

    def tell(self, kind: str, payload: object) -> None:
        """Put one message in every follower's queue; a stopped follower fails it at once."""
        self.check()
        for inbox in self._inboxes:
            inbox.put((kind, payload))

    def stop(self) -> None:
        """Let the followers leave their loop, then end them and this rank's group."""
        self._stopping = True
        if self._ranks is not None and not self.lost():
            self.announce(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        if self._ranks is not None and dist.is_initialized():
            dist.destroy_process_group()


def watch(processes: list, on_stop: Callable[[list[str]], None]) -> threading.Thread:
    """Call `on_stop` with the names of those that ended (on a thread of its own) as soon as
    any of `processes` ends."""

    def wait() -> None:
        ended = multiprocessing.connection.wait([process.sentinel for process in processes])
        on_stop([process.name for process in processes if process.sentinel in ended])

    thread = threading.Thread(target=wait, name="rank-watch", daemon=True)
    thread.start()
    return thread


def abort_group() -> None:
    """End this process's NCCL communicators: a collective waiting on them fails at once.
    (torch's API for it is still marked experimental; it exists from torch 2.6 on.)"""
    dist.distributed_c10d._abort_process_group()


def _tensors(header: dict, ranks: Ranks, device: torch.device) -> dict:
    """One announced forward's keyword arguments, its tensors received from rank 0."""
    call = dict(header["rest"])
    for name, shape, dtype in header["tensors"]:
        call[name] = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(call[name], src=0, group=ranks.group)
    return call


def _serve(inbox, model, ranks: Ranks, device: torch.device, capacity: int) -> None:
    """Do what rank 0 tells, in its order, until it says stop."""
    adapters = AdapterCache(capacity)
    while True:
        kind, payload = inbox.get()
        if kind == "stop":
            return
        if kind == "forward":
            call = _tensors(payload, ranks, device)
            try:
                with torch.inference_mode():
                    model.pipe.transformer(**call)
            except Exception as error:
                if not (model.compiled and compilation.is_compile_failure(error)):
                    raise
                # rank 0's compile failed alike (while tracing, before any collective): it falls
                # back to eager and repeats its warm-up, whose forwards it announces again
                compilation.fall_back_to_eager(model, error)
            continue
        try:  # a LoRA rank 0 cannot use fails its job there; here it is only logged
            if kind == "apply":
                adapters.apply(model, payload)
            elif kind == "slots":
                adapters.use_slots(model, payload)
        except Exception as error:  # noqa: BLE001
            log.warning("LoRA change %s failed here as on rank 0: %s", kind, error)


def _follow(settings: Settings, rank: int, world: int, store: str, device: str, inbox, ready, timeout: timedelta) -> None:
    """A follower's life: join the group, load the model split across the ranks, then do what
    rank 0 tells (forwards, LoRA changes) until it says stop."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    from model_loader import load_model

    where = torch.device(device)
    ready.put(rank)
    inbox.get()  # rank 0 has the model's files on disk and is joining
    ranks = _join(store, rank, world, where, timeout)
    model = load_model(settings, where, replica=rank, ranks=ranks)
    log.info("rank %d ready (process %d)", rank, os.getpid())
    _serve(inbox, model, ranks, where, settings.max_loaded_loras)
    dist.destroy_process_group()
