"""One job's latency on one GPU against GPU_PARALLELISM=context across several, through the worker.

    python3 benchmarks/context_latency.py --dir /tmp/cold --gpus 2,4 [--precision fp8] [--jobs 5]
    python3 benchmarks/context_latency.py --tiny --gpus 2      # CPU smoke run: gloo ranks, tiny model

On the GPU machine the real-size pipeline with random weights is saved once under --dir
(`cold_start.prepare`: followers load the model from disk as a worker does). Each mode runs
in a fresh process: `EditService` with `GPU_PARALLELISM=single` (one GPU), then `context` over
each GPU count of --gpus, `MAX_LORAS=0`, `MAX_BATCH_SIZE=1`, compiled and warmed up as at start; then one
untimed job and --jobs timed ones, one at a time (1024² output from a 1024² input, 8
Lightning steps, the same seed). It prints each mode's median latency and stages, each GPU's
memory in use (nvidia-smi) and rank 0's peak allocated and reserved by torch, and the
largest pixel difference from the single-GPU image.
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


def gpu_memory_gib() -> list[float]:
    """Memory in use on each GPU (nvidia-smi), GiB; empty without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [round(int(line) / 1024, 1) for line in out.split() if line.strip().isdigit()]


def child(mode: str, gpus: int, jobs: int, side: int) -> None:
    from real_size import input_png

    from config import Settings
    from qwen_edit_worker.service import EditService

    settings = Settings.from_env({**os.environ, "GPU_PARALLELISM": mode, "GPU_COUNT": str(gpus if mode == "context" else 1),
                                  "MAX_LORAS": "0", "MAX_BATCH_SIZE": "1"})  # fmt: skip
    service = EditService(settings)
    job = {"input": {"prompt": "Add a red hat to the person on the left", "image_base64": input_png(side, 0),
                     "width": side, "height": side, "seed": 1}}  # fmt: skip
    latencies, answers = [], []
    for n in range(jobs + 1):  # the first waits for the start-up and is not timed
        start = time.perf_counter()
        answer = asyncio.run(service.handle(dict(job, id=f"j{n}")))
        if "error" in answer:
            raise RuntimeError(answer["error"])
        if n:
            latencies.append(time.perf_counter() - start)
        answers.append(answer)
    memory = gpu_memory_gib()
    import torch  # rank 0's own share: allocated by tensors, and held by the caching allocator

    gib = 1 << 30
    own = {"rank0_allocated_gib": round(torch.cuda.max_memory_allocated(0) / gib, 1),
           "rank0_reserved_gib": round(torch.cuda.max_memory_reserved(0) / gib, 1)} if torch.cuda.is_available() else {}  # fmt: skip
    service.close()
    print("RESULT " + json.dumps({"mode": mode, "latency_s": round(statistics.median(latencies), 3),
                                  "timings_ms": answers[-1].get("timings_ms"), "gpu_gib": max(memory, default=None),
                                  "per_gpu_gib": memory, **own,
                                  "image": answers[-1]["output_image_base64"]}), flush=True)  # fmt: skip
    os._exit(0)


def pixels(b64: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


def worker_env(folder: str, tiny: bool, precision: str) -> dict[str, str]:
    """The worker's model variables: the tiny model, or the real-size pipeline with random
    weights saved once under `folder` (`cold_start.prepare`), which the worker loads from disk."""
    if tiny:
        env = {"MODEL_ID": "tiny-random", "MODEL_DIR": os.path.join(folder, "tiny"), "USE_LIGHTNING_LORA": "false"}
    else:
        from cold_start import prepare

        prepare(Path(folder))
        env = {"MODEL_ID": str(Path(folder, "model")), "MODEL_DIR": str(Path(folder, "volume"))}
    return {**env, "PRECISION_MODE": precision}


def child_result(script: str, args: list[str], tiny: bool, env: dict[str, str], timeout: float) -> tuple[dict | None, str]:
    """`script --child ARGS` in a fresh process with `env`: its RESULT line, or None and the end
    of what it wrote to stderr."""
    done = subprocess.run([sys.executable, script, "--child", *args, *(["--tiny"] if tiny else [])],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[0]), "") if lines else (None, done.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/cold")
    parser.add_argument("--gpus", default="2", help="GPU counts for context mode, comma-separated")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--mode-timeout", type=int, default=900, help="seconds one mode may take")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU ranks (gloo)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    side = 64 if args.tiny else 1024
    if args.child:
        child(args.child, int(args.gpus), args.jobs, side)
        return
    env = worker_env(args.dir, args.tiny, args.precision)
    results = {}
    for mode, gpus in (("single", 1), *(("context", int(n)) for n in args.gpus.split(","))):
        result, log = child_result(__file__, [mode, "--gpus", str(gpus), "--jobs", str(args.jobs)], args.tiny, env,
                                   args.mode_timeout)  # fmt: skip
        if result is None:
            print(json.dumps({"mode": mode, "gpus": gpus, "failed": log}), flush=True)
            continue
        results[mode, gpus] = result
        print(json.dumps({"gpus": gpus, **{k: v for k, v in results[mode, gpus].items() if k != "image"}}), flush=True)
    single = results.get(("single", 1))
    if single is None or len(results) < 2:
        sys.exit(1)
    print("\n| mode | GPUs | latency s | speed-up | denoise ms | largest GPU memory GiB | max pixel difference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (mode, gpus), result in results.items():
        difference = int(abs(pixels(single["image"]) - pixels(result["image"])).max())
        print(f"| {mode} | {gpus} | {result['latency_s']} | {single['latency_s'] / result['latency_s']:.2f} | "
              f"{(result['timings_ms'] or {}).get('denoise')} | {result['gpu_gib']} | {difference} |")  # fmt: skip


if __name__ == "__main__":
    main()
