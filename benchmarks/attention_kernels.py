"""The blocks' joint attention alone: PyTorch's SDPA (what `ATTENTION_BACKEND=native` runs)
against FlashAttention-3 (`auto` on a Hopper GPU), at the shapes a 1024² and a 512² edit give.

    python3 benchmarks/attention_kernels.py

Each case is q, k, v of [B, text + image, 24 heads, 128] in bfloat16 with the model's text and
image token counts; "padded" cases give the second sample a text half as long, as a batch of
prompts of unequal length does (SDPA with the joint mask, FA3 with the keys reordered,
`flash_attention`). Reports milliseconds per call (CUDA events, median of 50 after 10 warm
calls), TFLOP/s, and FA3's relative error against SDPA on the same inputs.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_edit_worker.engine import flash_attention, rope_attention  # noqa: E402

HEADS, HEAD_DIM = 24, 128
CASES = {  # name: (batch, text tokens, image tokens, padded)
    "1024², B=1": (1, 200, 8192, False),
    "1024², B=2 padded": (2, 200, 8192, True),
    "512², B=1": (1, 200, 2048, False),
    "512², B=4 padded": (4, 200, 2048, True),
}


def timed_ms(call, repeats: int = 50) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    reason = flash_attention.unavailable_reason(device, torch.bfloat16, HEAD_DIM)
    if reason:
        raise SystemExit(f"FlashAttention-3 cannot run here: {reason}")
    sdpa, fa3 = rope_attention.RealRopeAttnProcessor(), rope_attention.RealRopeAttnProcessor()
    fa3.flash = True
    print("\n| case | SDPA ms | FA3 ms | SDPA TFLOP/s | FA3 TFLOP/s | FA3 / SDPA | FA3 rel. error vs SDPA |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (batch, text, image, padded) in CASES.items():
        torch.manual_seed(0)
        txt, img = (tuple(torch.randn(batch, n, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in "qkv")
                    for n in (text, image))  # fmt: skip
        mask = None
        if padded:
            mask = torch.ones(batch, text, dtype=torch.bool, device=device)
            mask[1:, text // 2 :] = False
        with torch.inference_mode():
            expected = sdpa.attend(txt, img, mask).float()
            actual = fa3.attend(txt, img, mask).float()
            if padded:  # the padded queries' outputs are never used: compare the real tokens
                keep = torch.cat([mask, mask.new_ones(batch, image)], dim=1)
                expected, actual = expected[keep], actual[keep]
            error = float((actual - expected).norm() / expected.norm())
            sdpa_ms = timed_ms(lambda: sdpa.attend(txt, img, mask))
            fa3_ms = timed_ms(lambda: fa3.attend(txt, img, mask))
        flops = 4 * batch * HEADS * HEAD_DIM * (text + image) ** 2
        print(f"| {name} | {sdpa_ms:.3f} | {fa3_ms:.3f} | {flops / sdpa_ms / 1e9:.0f} | {flops / fa3_ms / 1e9:.0f} | "
              f"{fa3_ms / sdpa_ms:.2f} | {error:.1e} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
