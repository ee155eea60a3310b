"""Which devices the worker runs batches on (GPU_PARALLELISM, GPU_COUNT).

- `single`: one GPU, as on a one-GPU pod.
- `replicas`: every GPU holds the whole pipeline and has its own batcher lane; each ready
  batch goes to a free GPU. A lone job runs as fast as on one GPU; jobs that queue run
  N at a time. GPUs 1.. run in processes of their own (`replica_processes`), or with
  REPLICA_PROCESSES=false on threads of this process.
- `auto` (the default): replicas when several GPUs are visible, else single.

Replicas need the whole pipeline to fit on each GPU (bf16 or fp8; bitsandbytes places its
quantized layers on the first GPU itself, so 8bit and 4bit stay on one). On a machine
without a GPU, `replicas` with `GPU_COUNT=N` runs N CPU replicas of the tiny model: that is
what the tests use.
"""

from __future__ import annotations

import logging

import torch

from config import ConfigError, Settings

log = logging.getLogger("qwen_edit_worker.gpus")


def check_gpu_count(settings: Settings, visible: int | None = None) -> int:
    """The GPUs visible; a GPU_COUNT above that stops the worker with a sentence."""
    visible = torch.cuda.device_count() if visible is None else visible
    wanted = settings.gpu_count
    if visible and wanted > visible:
        raise ConfigError(f"GPU_COUNT must be at most the number of GPUs this worker sees ({visible}); got {wanted}.")
    return visible


def replica_devices(settings: Settings, visible: int | None = None) -> list[torch.device]:
    """The device of each replica, in lane order (one entry: no replicas); with
    GPU_PARALLELISM=context, of each rank (`context_ranks`)."""
    visible = check_gpu_count(settings, visible)
    mode, wanted = settings.gpu_parallelism, settings.gpu_count
    if visible == 0:
        # No GPU: the device check refuses the real model; the tiny model may be replicated on CPU.
        return [torch.device("cpu")] * ((wanted or 1) if mode in ("replicas", "context") else 1)
    count = wanted or visible
    if mode == "single" or count == 1:
        return [torch.device("cuda", 0)]
    if settings.uses_bitsandbytes:
        log.warning("PRECISION_MODE=%s runs on one GPU: bitsandbytes places its layers on the first GPU itself "
                    "(GPU_PARALLELISM=replicas needs bf16 or fp8)", settings.precision_mode)  # fmt: skip
        return [torch.device("cuda", 0)]
    log.info("%d GPUs: %s (GPU_PARALLELISM=%s)", count, "one job across them" if mode == "context" else
             "a replica of the pipeline on each", mode)  # fmt: skip
    return [torch.device("cuda", index) for index in range(count)]
