"""Queued jobs' throughput: one GPU against replicas on every GPU, as threads and as processes.

    python3 benchmarks/replica_throughput.py --dir /tmp/cold --gpus 4 [--jobs 8] [--precision fp8]
    python3 benchmarks/replica_throughput.py --tiny --gpus 2 --jobs 4   # CPU smoke run (64², 2 steps)

On the GPU machine the real-size pipeline with random weights is saved once under --dir
(`cold_start.prepare`: replica processes load the model from disk as a worker does). Each
mode runs in a fresh process, the worker's own `EditService` from its settings,
`MAX_LORAS=0`, `MAX_BATCH_SIZE=1`:
- `single`: one GPU;
- `threads`: `GPU_PARALLELISM=replicas`, `REPLICA_PROCESSES=false`, a replica per GPU on
  threads of one process;
- `processes`: `GPU_PARALLELISM=replicas`, `REPLICA_PROCESSES=true`, replicas 1.. in
  processes of their own.
Each waits until every replica serves (and prints how long that took), runs one untimed
round of two jobs per GPU, then submits --jobs jobs at once (1024² output from a 1024²
input, 8 Lightning steps, seeds 0..) and times them: images/s, median and slowest latency,
the median stages, and each job's timeline. The last lines are a markdown table, with the
largest pixel difference of each mode's first image from the single GPU's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from context_latency import child_result, gpu_memory_gib, pixels, worker_env  # noqa: E402

TINY_SIDE = 64
MODES = {
    "single": {"GPU_PARALLELISM": "single"},
    "threads": {"GPU_PARALLELISM": "replicas", "REPLICA_PROCESSES": "false"},
    "processes": {"GPU_PARALLELISM": "replicas", "REPLICA_PROCESSES": "true"},
}


def jobs(count: int, side: int, tag: str) -> list[dict]:
    from real_size import PROMPTS, input_png

    steps = {"num_inference_steps": 2} if side == TINY_SIDE else {}  # the smoke run: the steps do not matter
    return [{"id": f"{tag}-{i}", "input": {"prompt": PROMPTS[i % len(PROMPTS)], "image_base64": input_png(side, i),
                                           "width": side, "height": side, "seed": i, **steps}} for i in range(count)]  # fmt: skip


def wait_until_serving(service, timeout: float = 900) -> None:
    """Every replica warmed up: threads join `_serving`, processes say they are ready."""
    deadline = time.monotonic() + timeout
    while not (len(service._serving) == len(service.replicas) and all(r.ready.is_set() for r in service.remotes)):
        if service.batcher.failure is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the replicas did not all start: {service.batcher.failure}")
        time.sleep(0.1)


def child(mode: str, gpus: int, count: int, side: int) -> None:
    from gpu_speed import job_timeline

    from config import Settings
    from qwen_edit_worker.service import EditService

    started = time.perf_counter()
    settings = Settings.from_env({**os.environ, **MODES[mode], "GPU_COUNT": str(1 if mode == "single" else gpus),
                                  "MAX_LORAS": "0", "MAX_BATCH_SIZE": "1", "MAX_CONCURRENCY": str(max(count, 2 * gpus))})  # fmt: skip
    service = EditService(settings)  # its lanes start loading the model(s) now
    lanes = len(service.batcher.lanes)
    wait_until_serving(service)
    ready_s = time.perf_counter() - started

    async def all_at_once(batch: list[dict]) -> tuple[float, list[float], list[dict]]:
        async def one(job: dict) -> tuple[float, dict]:
            start = time.perf_counter()
            answer = await service.handle(job)
            return time.perf_counter() - start, answer

        start = time.perf_counter()
        done = await asyncio.gather(*(one(job) for job in batch))
        elapsed = time.perf_counter() - start
        for _, answer in done:
            if "error" in answer:
                raise RuntimeError(answer["error"])
        return elapsed, [latency for latency, _ in done], [answer for _, answer in done]

    asyncio.run(all_at_once(jobs(2 * lanes, side, "warm")))
    elapsed, latencies, answers = asyncio.run(all_at_once(jobs(count, side, "job")))
    memory = gpu_memory_gib()
    service.close()
    stages = {s: statistics.median(a["timings_ms"][s] for a in answers) for s in ("encode", "denoise", "decode")}
    print("RESULT " + json.dumps({"mode": mode, "gpus": lanes, "ready_s": round(ready_s, 1),
                                  "images_per_s": round(count / elapsed, 3), "p50_s": round(statistics.median(latencies), 2),
                                  "max_s": round(max(latencies), 2), "stage_ms": stages, "per_gpu_gib": memory,
                                  "timeline": job_timeline(answers), "image": answers[0]["output_image_base64"]}), flush=True)  # fmt: skip
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/cold")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs for the replica modes")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--modes", default="single,threads,processes")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--mode-timeout", type=int, default=600, help="seconds one mode may take")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU replicas")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    side = TINY_SIDE if args.tiny else 1024
    if args.child:
        child(args.child, args.gpus, args.jobs, side)
        return
    env = worker_env(args.dir, args.tiny, args.precision)
    results = {}
    for mode in args.modes.split(","):
        try:
            result, log = child_result(__file__, [mode, "--gpus", str(args.gpus), "--jobs", str(args.jobs)], args.tiny, env,
                                       args.mode_timeout)  # fmt: skip
        except subprocess.TimeoutExpired as expired:
            print(json.dumps({"mode": mode, "failed": f"over {args.mode_timeout} s", "log": str(expired.stderr)[-2000:]}), flush=True)
            continue
        if result is None:
            print(json.dumps({"mode": mode, "failed": log}), flush=True)
            continue
        results[mode] = result
        print(json.dumps({k: v for k, v in results[mode].items() if k != "image"}), flush=True)
    single = results.get("single")
    print("\n| mode | GPUs | ready s | images/s | × one GPU | p50 s | slowest s | encode / denoise / decode ms | max pixel difference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        speedup = f"{r['images_per_s'] / single['images_per_s']:.2f}" if single else "-"
        difference = int(abs(pixels(single["image"]) - pixels(r["image"])).max()) if single else "-"
        st = r["stage_ms"]
        print(f"| {mode} | {r['gpus']} | {r['ready_s']} | {r['images_per_s']} | {speedup} | {r['p50_s']} | {r['max_s']} | "
              f"{st['encode']:.0f} / {st['denoise']:.0f} / {st['decode']:.0f} | {difference} |")  # fmt: skip
    if len(results) < len(args.modes.split(",")):
        sys.exit(1)


if __name__ == "__main__":
    main()
