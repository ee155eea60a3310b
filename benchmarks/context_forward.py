"""Where a transformer forward's time goes in context mode: one GPU against 2 and 4.

    python3 benchmarks/context_forward.py --gpus 1,2,4 [--precision fp8] [--text 200]
    python3 benchmarks/context_forward.py --tiny --gpus 1,2      # CPU smoke run: gloo ranks, tiny transformer

For each GPU count, one fresh process per rank (NCCL; gloo on a CPU) builds the real-size
transformer with the same random weights (seed 0) and prepares it as the worker does
(`rope_attention.install`, `context_parallel.enable`, fp8, regional compile). After warm-up
forwards at 1024² output + one 1024² reference + --text prompt tokens, rank 0 times --repeat
forwards (wall clock, the GPU synchronised) and profiles as many (`forward_profile`: kernel
time by kind, the collectives a kind of their own, which includes any wait for a slower
rank; achieved TFLOP/s of rank 0's share, 1/N of the forward's work). Wall time above the kernel time is time the GPU waited for the host (collectives on
their own stream can also overlap compute, which makes it smaller). Prints a JSON line per
GPU count and markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import context_parallel
    import context_ranks
    import forward_profile
    import fp8
    import rope_attention
    from gpu_speed import random_transformer

    device = torch.device("cpu") if args.tiny else torch.device("cuda", rank)
    dtype, side = (torch.float32, 4) if args.tiny else (torch.bfloat16, 64)  # 64² patches: 1024²
    ranks = context_ranks._join(store, rank, world, device, timedelta(minutes=5))
    transformer = random_transformer(device, dtype, args.tiny)  # the same weights on every rank
    rope_attention.install(transformer)
    context_parallel.enable(transformer, ranks)
    if args.precision == "fp8":
        fp8.quantize(transformer)
    transformer.compile_repeated_blocks(fullgraph=True)
    torch.manual_seed(1)  # the same inputs on every rank, as rank 0's broadcast gives them
    inputs = forward_profile.forward_inputs(transformer, side, args.text, device, dtype)

    def forwards(count: int) -> float:
        """Seconds per forward, the device synchronised before and after."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(count):
            transformer(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / count

    with torch.inference_mode():
        forwards(3)  # compile, warm up
        wall_ms = forwards(args.repeat) * 1000
        activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as recorded:
            forwards(args.repeat)
    if rank == 0:
        tokens = 2 * side**2 + args.text
        # rank 0's share of the work: 1/N of the forward's (the text, which every rank runs whole, left out)
        share = {kind: flops / world for kind, flops in forward_profile.forward_flops(transformer.config, tokens).items()}
        summary = forward_profile.summarise(forward_profile.kernel_times_us(recorded, device), args.repeat, share)
        summary.update(gpus=world, wall_ms=wall_ms, tokens=tokens,
                       device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")  # fmt: skip
        Path(out).write_text(json.dumps(summary))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", default="1,2", help="GPU counts, comma-separated")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    parser.add_argument("--text", type=int, default=200, help="prompt tokens")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny transformer on CPU ranks (gloo)")
    args = parser.parse_args()
    if args.tiny:  # one inductor compile worker per rank process: a CI machine has two cores
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    rows = []
    for world in (int(n) for n in args.gpus.split(",")):
        with tempfile.TemporaryDirectory() as scratch:
            out = os.path.join(scratch, "result.json")
            mp.spawn(_rank, args=(world, os.path.join(scratch, "store"), args, out), nprocs=world)
            rows.append(json.loads(Path(out).read_text()))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "top"}), flush=True)
    import forward_profile

    base = rows[0]["wall_ms"]
    print(f"\n{args.precision}, {rows[0]['device']}, S = {rows[0]['tokens']} tokens\n")
    print("| GPUs | wall ms per forward | speed-up | kernel ms | " + " | ".join(forward_profile.KINDS) + " | wall − kernels ms |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in forward_profile.KINDS) + " | --- |")
    for row in rows:
        kinds = " | ".join(f"{row['ms'][kind]:.1f}" for kind in forward_profile.KINDS)
        print(f"| {row['gpus']} | {row['wall_ms']:.1f} | {base / row['wall_ms']:.2f} | {row['ms_per_forward']:.1f} | {kinds} | "
              f"{row['wall_ms'] - row['ms_per_forward']:.1f} |")  # fmt: skip
    for row in rows:
        print(forward_profile.markdown(f"{row['gpus']} GPU(s), rank 0", row))


if __name__ == "__main__":
    main()
