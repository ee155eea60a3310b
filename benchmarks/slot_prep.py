"""What preparing the LoRA slots costs on the real-size transformer, slot by slot.

    python3 benchmarks/slot_prep.py [--slots 3] [--rank 64] [--profile] [--tiny]

Builds the real-size transformer with random weights on the GPU (`gpu_speed.random_transformer`)
and does what `adapters.prepare_slots` does (diffusers' `enable_lora_hotswap`, then one blank
LoRA over the blocks' 840 linear layers per slot), timing each slot. With --profile it then
builds a fresh transformer and runs `prepare_slots` under cProfile (which inflates Python's
share: the slot times above are the ones to quote) and prints the functions that took longest.
--tiny: the tiny transformer on the CPU (the test suite's smoke run).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from adapters import blank_lora, prepare_slots  # noqa: E402
from gpu_speed import random_transformer  # noqa: E402


def pipeline_of(transformer):
    """A pipeline around `transformer` alone: slots need only the pipeline's LoRA methods."""
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=transformer)  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    build = lambda: pipeline_of(random_transformer(device, torch.bfloat16, args.tiny))  # noqa: E731
    pipe = build()
    pipe.enable_lora_hotswap(target_rank=args.rank)
    for slot in range(args.slots):
        start = time.perf_counter()
        pipe.load_lora_weights(blank_lora(pipe.transformer, args.rank), adapter_name=f"slot{slot}")
        synchronize(device)
        print(f"slot{slot}: {time.perf_counter() - start:.2f} s", flush=True)
    if not args.profile:
        return
    del pipe
    pipe = build()
    profile, start = cProfile.Profile(), time.perf_counter()
    profile.enable()
    prepare_slots(pipe, args.slots, args.rank)
    synchronize(device)
    profile.disable()
    print(f"prepare_slots under cProfile: {time.perf_counter() - start:.2f} s")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
    print(text.getvalue())


if __name__ == "__main__":
    main()
