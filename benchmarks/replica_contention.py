"""Do replicas in one process wait for each other's Python? The same forwards from N threads
of one process (as `GPU_PARALLELISM=replicas` runs them) and from N processes.

    python3 benchmarks/replica_contention.py --gpus 4 [--repeat 8] [--text 200]
    python3 benchmarks/replica_contention.py --tiny --gpus 2 --repeat 2   # CPU smoke run

Each GPU holds the real-size transformer with the same random weights (seed 0), prepared as
the worker prepares it (real-valued RoPE, regional compile), and runs --repeat forwards at
1024² output + one 1024² reference + --text prompt tokens, the GPU synchronised at the end.
Three set-ups, each GPU's wall ms per forward:
- `alone`: one thread on the first GPU (the one-GPU figure);
- `threads`: one thread per GPU in this process, all started together;
- `processes`: one process per GPU, all started together.
Also each thread's CPU time per forward (`time.thread_time`): the host work a forward needs.
With N threads that work shares one interpreter; if N times it exceeds a forward's GPU time,
the GPUs wait for Python, which `processes` would not. Prints a JSON line per set-up and a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def prepared(device: torch.device, tiny: bool, text: int):
    """The transformer on `device` as the worker runs it, and one forward's inputs."""
    import forward_profile
    import rope_attention
    from gpu_speed import random_transformer

    dtype, side = (torch.float32, 4) if tiny else (torch.bfloat16, 64)  # 64² patches: 1024²
    transformer = random_transformer(device, dtype, tiny)
    rope_attention.install(transformer)
    transformer.compile_repeated_blocks(fullgraph=True)
    torch.manual_seed(1)
    return transformer, forward_profile.forward_inputs(transformer, side, text, device, dtype)


def warmed_up(device: torch.device, args: argparse.Namespace):
    """`prepared` on `device`, compiled and warmed up by two forwards."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    transformer, inputs = prepared(device, args.tiny, args.text)
    timed_forwards(transformer, inputs, device, 2)
    return transformer, inputs


def timed_forwards(transformer, inputs: dict, device: torch.device, count: int, start: threading.Barrier | None = None) -> dict:
    """Wall and this thread's CPU ms per forward over `count` forwards, after `start` lets all go."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # a thread's own current GPU
        torch.cuda.synchronize(device)
    if start is not None:
        start.wait()
    wall, cpu = time.perf_counter(), time.thread_time()
    with torch.inference_mode():
        for _ in range(count):
            transformer(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {"wall_ms": (time.perf_counter() - wall) * 1000 / count, "cpu_ms": (time.thread_time() - cpu) * 1000 / count}


def devices(count: int, tiny: bool) -> list[torch.device]:
    return [torch.device("cpu") if tiny else torch.device("cuda", k) for k in range(count)]


def in_threads(count: int, args: argparse.Namespace) -> list[dict]:
    """One thread per device in this process, after each device's model compiled (one at a time:
    tracing in one thread breaks modules running in another)."""
    models = [(*warmed_up(device, args), device) for device in devices(count, args.tiny)]
    start, results = threading.Barrier(count), [None] * count

    def run(k: int) -> None:
        transformer, inputs, device = models[k]
        results[k] = timed_forwards(transformer, inputs, device, args.repeat, start)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _process(rank: int, count: int, args: argparse.Namespace, start, folder: str) -> None:
    device = devices(count, args.tiny)[rank]
    transformer, inputs = warmed_up(device, args)
    result = timed_forwards(transformer, inputs, device, args.repeat, start)
    Path(folder, f"{rank}.json").write_text(json.dumps(result))


def in_processes(count: int, args: argparse.Namespace) -> list[dict]:
    context = mp.get_context("spawn")
    start = context.Barrier(count)
    with tempfile.TemporaryDirectory() as folder:
        workers = [context.Process(target=_process, args=(k, count, args, start, folder)) for k in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
            if worker.exitcode != 0:
                raise RuntimeError(f"a replica process ended with exit code {worker.exitcode}")
        return [json.loads(Path(folder, f"{k}.json").read_text()) for k in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--text", type=int, default=200, help="prompt tokens")
    parser.add_argument("--tiny", action="store_true", help="the tiny transformer on the CPU (a smoke run)")
    args = parser.parse_args()
    if args.tiny:  # one inductor compile worker per process: a CI machine has two cores
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    rows = []
    for setup, run in (("alone", lambda: in_threads(1, args)), ("threads", lambda: in_threads(args.gpus, args)),
                       ("processes", lambda: in_processes(args.gpus, args))):  # fmt: skip
        per_gpu = run()
        row = {"setup": setup, "gpus": len(per_gpu), "wall_ms": [round(r["wall_ms"], 1) for r in per_gpu],
               "cpu_ms": [round(r["cpu_ms"], 1) for r in per_gpu]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = "CPU" if args.tiny else torch.cuda.get_device_name(0)
    shape = "the tiny transformer" if args.tiny else "1024² + one 1024² reference"
    print(f"\n{name}, {args.repeat} forwards per GPU, {shape} + {args.text} text tokens\n")
    print("| set-up | GPUs | wall ms per forward (mean, slowest GPU) | against alone | CPU ms per forward per thread |")
    print("| --- | --- | --- | --- | --- |")
    alone = rows[0]["wall_ms"][0]
    for row in rows:
        mean = statistics.mean(row["wall_ms"])
        print(f"| {row['setup']} | {row['gpus']} | {mean:.1f}, {max(row['wall_ms']):.1f} | {mean / alone:.2f} | "
              f"{statistics.mean(row['cpu_ms']):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
