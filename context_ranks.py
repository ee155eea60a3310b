"""GPU_PARALLELISM=context: one process per GPU, and every transformer forward runs on all of them.

Rank 0 is the worker itself: the RunPod loop, the batcher, the engine, the text encoder and
the VAE. Ranks 1.. are follower processes that it starts. Every rank loads the same pipeline
(`model_loader.load_model`: the same Lightning fuse, fp8 and compile) with its transformer
split across the ranks (`context_parallel`). Before rank 0's transformer runs, it announces
the call: the call's arguments go to the followers by broadcast, and then every rank runs the
same forward, its collectives meeting the others'. Rank 0's warm-ups are such calls too, so
the followers compile in step with it.

A follower that dies makes the next forward fail (`RankLost`); the worker then retires and
every job it holds is answered once (`service`). A rank that hangs fails the forward once
the process group's timeout (`TIMEOUT`) has passed.
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

log = logging.getLogger("qwen_edit_worker.ranks")

# How long rank 0 waits for the followers to join the group, and any rank for the others in
# a collective: rank 0's first forward waits while the followers load the model, as it has
# (about as long), and a hung rank is noticed only after this.
TIMEOUT = timedelta(minutes=10)


class RankLost(RuntimeError):
    """A follower process stopped: no forward can run across the ranks any more."""


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _join(store: str, rank: int, world: int, device: torch.device) -> Ranks:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(_backend(device), init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)  # fmt: skip
    return Ranks(rank, world, dist.group.WORLD)


class Followers:
    """Ranks 1.. as processes; rank 0 (this process) joins them in `join`."""

    def __init__(self, settings: Settings, devices: list[torch.device]):
        self.devices = devices
        self._store = os.path.join(tempfile.mkdtemp(prefix="qwen-edit-ranks-"), "store")
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.processes = [
            spawn.Process(target=_follow, args=(settings, rank, len(devices), self._store, str(device)), name=f"rank-{rank}")
            for rank, device in enumerate(devices) if rank
        ]  # fmt: skip
        for process in self.processes:
            process.start()
        log.info("GPU_PARALLELISM=context: %d follower processes started", len(self.processes))

    def join(self) -> Ranks:
        """Rank 0's place in the process group, once every follower has joined it."""
        try:
            ranks = _join(self._store, 0, len(self.devices), self.devices[0])
        except Exception as error:  # noqa: BLE001 - one sentence, then the worker stops
            lost = f" ({', '.join(self.lost())} stopped)" if self.lost() else ""
            raise RankLost(f"the GPU processes could not form a process group{lost}: {str(error).strip()[:300]}") from error
        log.info("process group formed: %d ranks (%s)", ranks.size, _backend(self.devices[0]))
        return ranks

    def lost(self) -> list[str]:
        """The followers that have stopped."""
        return [process.name for process in self.processes if not process.is_alive()]

    def stop(self, ranks: Ranks | None) -> None:
        """Let the followers leave their loop (when the group still works), then end them."""
        if ranks is not None and not self.lost():
            try:
                _announce(ranks, None)
            except Exception as error:  # noqa: BLE001 - they are ended below anyway
                log.warning("could not tell the followers to stop: %s", error)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        if ranks is not None and dist.is_initialized():
            dist.destroy_process_group()


def lead(transformer, ranks: Ranks) -> None:
    """On rank 0: every call of `transformer` is announced to the followers before it runs."""
    transformer.register_forward_pre_hook(lambda module, args, kwargs: _announce(ranks, kwargs), with_kwargs=True)


def _announce(ranks: Ranks, call: dict | None) -> None:
    """Broadcast one forward's keyword arguments (None: stop): the rest by pickle, the tensors as tensors."""
    tensors = {name: value for name, value in (call or {}).items() if isinstance(value, torch.Tensor)}
    header = None if call is None else {
        "tensors": [(name, tuple(value.shape), value.dtype) for name, value in sorted(tensors.items())],
        "rest": {name: value for name, value in call.items() if name not in tensors},
    }  # fmt: skip
    dist.broadcast_object_list([header], src=0, group=ranks.group)
    for name, _, _ in header["tensors"] if header else ():
        dist.broadcast(tensors[name].contiguous(), src=0, group=ranks.group)


def _receive(ranks: Ranks, device: torch.device) -> dict | None:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=ranks.group)
    header = box[0]
    if header is None:
        return None
    call = dict(header["rest"])
    for name, shape, dtype in header["tensors"]:
        call[name] = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(call[name], src=0, group=ranks.group)
    return call


def _follow(settings: Settings, rank: int, world: int, store: str, device: str) -> None:
    """A follower's life: join the group, load the model split across the ranks, then run
    every forward rank 0 announces until it says stop."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    from model_loader import load_model

    where = torch.device(device)
    ranks = _join(store, rank, world, where)
    model = load_model(settings, where, replica=rank, ranks=ranks)
    transformer = model.pipe.transformer
    log.info("rank %d ready (process %d)", rank, os.getpid())
    while (call := _receive(ranks, where)) is not None:
        with torch.inference_mode():
            transformer(**call)
    dist.destroy_process_group()
