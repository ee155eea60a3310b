"""Batched vs one-at-a-time throughput of the whole job path, on the tiny model (CPU).

    .venv/bin/python benchmarks/batching_throughput.py [--jobs 32] [--size 128] [--steps 4]

Submits the same jobs concurrently to an `EditService` (validation, decoding, the
batcher, the engine, PNG encoding) twice: with MAX_BATCH_SIZE=1 (one job at a time, the
stock pipeline's way) and with batching on. Prints images/s and p50/p95 latency of each.
This measures the tiny model on a CPU: it shows that batching works and what it saves in
per-call overhead, not what it does on a GPU at real size (see benchmarks/ for that).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from qwen_edit_worker.service import EditService  # noqa: E402

PROMPTS = ["make the sky pink", "add snow", "turn it into a watercolor painting", "night", "a red hat"]


def jobs(count: int, size: int, steps: int) -> list[dict]:
    sample = base64.b64encode((ROOT / "assets" / "sample.png").read_bytes()).decode()
    return [
        {"id": f"job-{i}", "input": {"prompt": PROMPTS[i % len(PROMPTS)], "image_base64": sample, "seed": i,
                                     "width": size, "height": size, "num_inference_steps": steps}}  # fmt: skip
        for i in range(count)
    ]


async def run(settings: Settings, batch: list[dict]) -> tuple[float, list[float], list[int]]:
    service = EditService(settings)
    service.holder.get()
    await service.handle(batch[0])  # warm-up, not timed
    latencies: list[float] = []

    async def one(job: dict) -> int:
        start = time.perf_counter()
        result = await service.handle(job)
        latencies.append(time.perf_counter() - start)
        assert "error" not in result, result
        return result["batch_size"]

    start = time.perf_counter()
    sizes = await asyncio.gather(*(one(job) for job in batch))
    elapsed = time.perf_counter() - start
    service.close()
    return elapsed, latencies, list(sizes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    batch = jobs(args.jobs, args.size, args.steps)
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        for label, max_batch in [("one at a time", 1), (f"batched (max {args.batch})", args.batch)]:
            settings = Settings.from_env({
                "MODEL_ID": "tiny-random", "MODEL_DIR": model_dir, "USE_LIGHTNING_LORA": "false",
                "MAX_BATCH_SIZE": str(max_batch), "MAX_CONCURRENCY": str(args.jobs), "BATCH_WAIT_MS": "50",
            })  # fmt: skip
            elapsed, latencies, sizes = asyncio.run(run(settings, batch))
            q = statistics.quantiles(latencies, n=20)
            rows.append((label, args.jobs / elapsed, q[9], q[18], statistics.mean(sizes)))
    base = rows[0][1]
    print(f"\n{args.jobs} jobs, {args.size}x{args.size}, {args.steps} steps, tiny-random on CPU")
    print("| mode | images/s | p50 latency s | p95 latency s | mean jobs per GPU batch | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, rate, p50, p95, mean_batch in rows:
        print(f"| {label} | {rate:.2f} | {p50:.2f} | {p95:.2f} | {mean_batch:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
