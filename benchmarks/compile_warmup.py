"""How long a compiled worker takes to start, first on an empty compile cache, then restarted.

    python3 benchmarks/compile_warmup.py --model-dir /tmp/volume [--fp8]    # run it twice

Builds the real-size pipeline with random weights on the GPU (as gpu_speed.py does), then
does what a starting worker does: the loader's fp8 step (with --fp8), the loader's regional
compile (which points TORCHINDUCTOR_CACHE_DIR at MODEL_DIR/torchinductor), the engine's
start-up warm-up, and a first 1024² Lightning-8 job. Run it twice with the same
--model-dir: the second run is a worker restarted on the same network volume. Prints one
JSON line; nothing here is mocked except the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from config import Settings  # noqa: E402
from engine import EditEngine, EditRequest  # noqa: E402
from gpu_speed import build_pipeline  # noqa: E402
from compilation import compile_transformer, should_compile  # noqa: E402
import fp8  # noqa: E402
import rope_attention  # noqa: E402
from model_loader import LoadedModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True, help="stands for the network volume; keep it between runs")
    parser.add_argument("--fp8", action="store_true", help="PRECISION_MODE=fp8")
    args = parser.parse_args()
    cache = Path(args.model_dir) / "torchinductor"
    cached_files = sum(1 for _ in cache.rglob("*")) if cache.exists() else 0
    settings = Settings.from_env({"MODEL_ID": "real-size-random", "MODEL_DIR": args.model_dir,
                                  "PRECISION_MODE": "fp8" if args.fp8 else "bf16"})  # fmt: skip
    pipe = build_pipeline()
    rope_attention.install(pipe.transformer)  # the loader's steps, in its order
    if args.fp8:
        fp8.quantize(pipe.transformer)
    device = torch.device("cuda")
    compiled = should_compile(settings, device, bnb_quantized=False, offload="none")
    if compiled:
        compile_transformer(pipe, settings)
    model = LoadedModel(pipe, device, torch.bfloat16, settings.precision_mode, True, "none", compiled)
    engine = EditEngine(settings, lambda: model)

    start = time.perf_counter()
    engine.warm_up()
    warm_up_s = time.perf_counter() - start

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    job = EditRequest(prompt="Add a red hat to the person on the left", images=(image,), seed=0,
                      num_inference_steps=8, true_cfg_scale=1.0, width=1024, height=1024)  # fmt: skip
    start = time.perf_counter()
    engine.run_batch([job])
    first_job_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.run_batch([job])
    second_job_s = time.perf_counter() - start
    print(json.dumps({"precision": settings.precision_mode, "compiled": compiled,
                      "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "cache_files_before": cached_files,
                      "warm_up_s": round(warm_up_s, 1), "first_job_s": round(first_job_s, 2),
                      "second_job_s": round(second_job_s, 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
