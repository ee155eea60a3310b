"""What regional compilation of the transformer does, per precision, on a few real-size blocks.

    python3 benchmarks/compile_probe.py --blocks 2,4 --modes bf16,fp8,fp8+slot

Each case runs in a fresh process with the compile caches off: a transformer of Qwen-Image's
real width with `--blocks` blocks (random bf16 weights on the GPU), then for `fp8` the loader's
torchao step, for `+slot` one LoRA slot of rank 64 (`adapters.prepare_slots`, slot active),
then `compile_repeated_blocks` as the worker does. Three forwards at 1024² output with one
1024² reference and texts of 200, 230 and 180 tokens: the first compiles, the second
recompiles once for a dynamic text length, the third must compile nothing. Prints one JSON
line per case: seconds per forward, graphs dynamo compiled in each, and its recompilation
reasons. If graphs grow with the number of blocks, every block compiles its own graph.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def case(blocks: int, mode: str) -> dict:
    import torch
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from torch._dynamo.utils import counters

    from adapters import prepare_slots
    from forward_profile import forward_inputs
    import fp8

    reasons: list[str] = []

    class Recompiles(logging.Handler):
        def emit(self, record):
            reasons.append(record.getMessage().strip().splitlines()[-1][:300])

    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(Recompiles())
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        transformer = QwenImageTransformer2DModel(num_layers=blocks).eval()
        torch.set_default_dtype(torch.float32)
    pipe = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=transformer)  # fmt: skip
    if mode.startswith("fp8"):
        fp8.quantize(transformer)
    if mode.endswith("+slot"):
        prepare_slots(pipe, 1, 64)
        pipe.enable_lora()
    transformer.compile_repeated_blocks(fullgraph=True)
    times, graphs = [], []
    for text in (200, 230, 180):
        before = counters["stats"]["unique_graphs"]
        inputs = forward_inputs(transformer, 64, text, torch.device("cuda"), torch.bfloat16)  # 1024²: 64² patches
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            transformer(**inputs)
        torch.cuda.synchronize()
        times.append(round(time.perf_counter() - start, 2))
        graphs.append(counters["stats"]["unique_graphs"] - before)
    from torch._dynamo.utils import compile_times

    phases = [line for line in compile_times(repr="str").splitlines() if line.strip()][:14]
    return {"blocks": blocks, "mode": mode, "seconds": times, "graphs": graphs, "recompile_reasons": reasons[:8],
            "compile_phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", default="2,4")
    parser.add_argument("--modes", default="bf16,fp8")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        blocks, mode = args.case.split(":")
        print("RESULT " + json.dumps(case(int(blocks), mode)), flush=True)
        return
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    for mode in args.modes.split(","):
        for blocks in args.blocks.split(","):
            done = subprocess.run([sys.executable, __file__, "--case", f"{blocks}:{mode}"], env=env, capture_output=True,
                                  text=True, timeout=540)  # fmt: skip
            lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            print(lines[0] if lines else json.dumps({"blocks": blocks, "mode": mode, "error": done.stderr[-1500:]}), flush=True)


if __name__ == "__main__":
    main()
