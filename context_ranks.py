"""GPU_PARALLELISM=context: one process per GPU, and every transformer forward runs on all of them.

Rank 0 is the worker itself: the RunPod loop, the batcher, the engine, the text encoder and
the VAE. Ranks 1.. are follower processes that it starts. Every rank loads the same pipeline
(`model_loader.load_model`: the same Lightning fuse, fp8 and compile) with its transformer
split across the ranks (`context_parallel`). Before rank 0's transformer runs, it announces
the call: the call's shapes and other arguments go to each follower through a queue (a wait
with no timeout: a worker may idle for hours between jobs), its tensors by broadcast, and
then every rank runs the same forward, its collectives meeting the others'. Rank 0's
warm-ups are such calls too, so the followers compile in step with it.

A follower that has stopped makes the next forward fail at once (`RankLost`); the worker then
retires and every job it holds is answered once (`service`). A rank that stops or hangs in
the middle of a forward fails it once the process group's timeout (`TIMEOUT`) has passed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

from config import Settings
from context_parallel import Ranks
from model_files import resolve_lora_path, resolve_model_path

log = logging.getLogger("qwen_edit_worker.ranks")

# How long rank 0 waits for the followers to join the group, and any rank for the others in a
# forward's collectives: rank 0's first forward waits while the followers load the model, as
# it has (about as long).
TIMEOUT = timedelta(minutes=10)


class RankLost(RuntimeError):
    """A follower process stopped: no forward can run across the ranks any more."""


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


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
        self.processes = [
            spawn.Process(target=_follow, args=(settings, rank, len(devices), self._store, str(device), inbox, TIMEOUT),
                          name=f"rank-{rank}")
            for rank, (device, inbox) in enumerate(zip(devices[1:], self._inboxes), start=1)
        ]  # fmt: skip
        self._ranks: Ranks | None = None
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
        for inbox in self._inboxes:
            inbox.put("join")
        try:
            ranks = _join(self._store, 0, len(self.devices), self.devices[0], TIMEOUT)
        except Exception as error:  # noqa: BLE001 - one sentence, then the worker stops
            lost = f" ({', '.join(self.lost())} stopped)" if self.lost() else ""
            raise RankLost(f"the GPU processes could not form a process group{lost}: {str(error).strip()[:300]}") from error
        log.info("process group formed: %d ranks (%s)", ranks.size, _backend(self.devices[0]))
        self._ranks = Ranks(0, ranks.size, ranks.group, announce=self.announce)
        return self._ranks

    def lost(self) -> list[str]:
        """The followers that have stopped."""
        return [process.name for process in self.processes if not process.is_alive()]

    def announce(self, call: dict | None) -> None:
        """Tell every follower about one forward (None: stop), then send its tensors."""
        if lost := self.lost():
            raise RankLost(f"{', '.join(lost)} of the GPU processes stopped")
        tensors = {name: value for name, value in (call or {}).items() if isinstance(value, torch.Tensor)}
        header = None if call is None else {
            "tensors": [(name, tuple(value.shape), value.dtype) for name, value in sorted(tensors.items())],
            "rest": {name: value for name, value in call.items() if name not in tensors},
        }  # fmt: skip
        for inbox in self._inboxes:
            inbox.put(header)
        for name in sorted(tensors):
            dist.broadcast(tensors[name].contiguous(), src=0, group=self._ranks.group)

    def stop(self) -> None:
        """Let the followers leave their loop, then end them and this rank's group."""
        if self._ranks is not None and not self.lost():
            self.announce(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        if self._ranks is not None and dist.is_initialized():
            dist.destroy_process_group()


def lead(transformer, ranks: Ranks) -> None:
    """On rank 0: every call of `transformer` is announced to the followers before it runs."""
    if ranks.announce is not None:
        transformer.register_forward_pre_hook(lambda module, args, kwargs: ranks.announce(kwargs), with_kwargs=True)


def _receive(inbox, ranks: Ranks, device: torch.device) -> dict | None:
    """The next forward's keyword arguments from rank 0 (None: stop)."""
    header = inbox.get()
    if header is None:
        return None
    call = dict(header["rest"])
    for name, shape, dtype in header["tensors"]:
        call[name] = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(call[name], src=0, group=ranks.group)
    return call


def _follow(settings: Settings, rank: int, world: int, store: str, device: str, inbox, timeout: timedelta) -> None:
    """A follower's life: join the group, load the model split across the ranks, then run
    every forward rank 0 announces until it says stop."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    from model_loader import load_model

    where = torch.device(device)
    inbox.get()  # rank 0 has the model's files on disk
    ranks = _join(store, rank, world, where, timeout)
    model = load_model(settings, where, replica=rank, ranks=ranks)
    transformer = model.pipe.transformer
    log.info("rank %d ready (process %d)", rank, os.getpid())
    while (call := _receive(inbox, ranks, where)) is not None:
        with torch.inference_mode():
            transformer(**call)
    dist.destroy_process_group()
