"""Probe for the next step of per-request LoRAs: hot-swapping into a compiled transformer.

    python3 benchmarks/lora_hotswap_probe.py

Not the worker's code path (the worker turns eager at its first LoRA job today). Real-size
random weights, bf16, 1024² output, 8 steps, one job per row, on one GPU:
  1. compiled, no adapter (the baseline);
  2. diffusers' `enable_lora_hotswap(target_rank=64)`, one slot loaded with a blank (zero)
     rank-64 LoRA over the 720 linear layers, compiled: what a slot costs a job;
  3. three LoRAs hot-swapped into the slot (rank 64; rank 16; rank 64 on attention only):
     recompilations counted, time per job;
  4. `disable_lora()` on the compiled slot: does it recompile, and what does a job cost then.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from config import Settings  # noqa: E402
from engine import EditEngine, EditRequest  # noqa: E402
from gpu_speed import build_pipeline  # noqa: E402
from lora_cost import rank64  # noqa: E402
from model_loader import LoadedModel  # noqa: E402


def recompiles() -> int:
    """Graphs dynamo has compiled so far (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    pipe = build_pipeline()
    model = LoadedModel(pipe, torch.device("cuda"), torch.bfloat16, "bf16", True, "none", compiled=True)
    engine = EditEngine(Settings.from_env({"MODEL_ID": "real-size-random"}), lambda: model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    job = EditRequest(prompt="Add a red hat", images=(image,), seed=1, num_inference_steps=8, true_cfg_scale=1.0,
                      width=1024, height=1024)  # fmt: skip

    def timed(label: str) -> None:
        before = recompiles()
        start = time.perf_counter()
        try:
            result = engine.run_batch([job])[0]
            print(f"| {label} | {time.perf_counter() - start:.2f} | {result.timings_ms['denoise'] / 1000:.2f} | "
                  f"{recompiles() - before} |", flush=True)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - a probe reports what happened
            print(f"| {label} | failed: {type(error).__name__}: {str(error)[:200]} | | |", flush=True)

    # Every LoRA is made from the plain transformer (once adapters are in, its module names change).
    states = {seed: rank64(pipe.transformer, seed, rank) for seed, rank in ((0, 64), (1, 64), (2, 16), (3, 64))}
    print("| job | wall s | denoise s | graphs compiled |\n| --- | --- | --- | --- |")
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    timed("compiled, no adapter: first (compiles)")
    timed("compiled, no adapter")
    timed("compiled, no adapter")
    # Start again with a slot: uncompile, enable hotswap, load the blank, compile.
    for module in pipe.transformer.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()
    blank = {k: (torch.zeros_like(v) if "lora_up" in k else v) for k, v in states[0].items()}
    pipe.enable_lora_hotswap(target_rank=64)
    pipe.load_lora_weights(blank, adapter_name="slot0")
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    timed("slot with a blank LoRA: first (compiles)")
    timed("slot with a blank LoRA")
    attention_only = {k: v for k, v in states[3].items() if ".attn." in k}
    for label, state in [("hot-swapped LoRA A, rank 64", states[1]),
                         ("hot-swapped LoRA B, rank 16", states[2]),
                         ("hot-swapped LoRA C, attention only", attention_only)]:  # fmt: skip
        start = time.perf_counter()
        try:
            pipe.load_lora_weights(state, adapter_name="slot0", hotswap=True)
            swap = time.perf_counter() - start
            timed(f"{label} (swap took {swap:.2f} s)")
            timed(label)
        except Exception as error:  # noqa: BLE001
            print(f"| {label} | swap failed: {type(error).__name__}: {str(error)[:200]} | | |", flush=True)
    pipe.disable_lora()
    timed("disable_lora() on the compiled slot: first")
    timed("disable_lora() on the compiled slot")
    pipe.enable_lora()
    timed("enable_lora() again")
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)


if __name__ == "__main__":
    main()
