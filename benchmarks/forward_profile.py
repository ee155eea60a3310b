"""Where one transformer forward's time goes: kernels by kind, the top kernels, achieved TFLOP/s.

    python3 benchmarks/gpu_speed.py --profile bf16,fp8 [--profile-text 200]

(`gpu_speed.py` builds the real-size pipeline and calls `profile` for each precision: for fp8
the loader's own torchao step; regional compile as the worker does.) One forward at 1024²
output with one 1024² reference (2 × 4096 image tokens) and `text` prompt tokens: after
warm-up forwards (compilation), `torch.profiler` records `repeat` forwards and every device
kernel's time is put in one of four kinds:

- **matmul**: GEMMs (cuBLAS, cuBLASLt/nvjet, CUTLASS, `_scaled_mm`), the linear layers;
- **attention**: the fused attention kernels (cuDNN, FlashAttention, SDPA);
- **quantization**: inductor's fused activation-quantization kernels of fp8 (abs/amax with
  a clamp or a float8 cast in their name);
- **communication**: NCCL's kernels (context mode's collectives, their wait for a slower
  rank included);
- **other**: everything else (RoPE, norms, modulation, GELU, copies).

Achieved TFLOP/s divides the work by the time of its kind: the linears are 2·12·d² FLOP per
token and block (each token passes one stream's q, k, v, out and MLP; modulation runs once
per sample), attention 4·S²·d per block. On a CPU (the tests) it profiles CPU operators.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

KINDS = ("matmul", "attention", "quantization", "communication", "other")
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|_attn|fprop.*sdpa", re.I)
_MATMUL = re.compile(r"gemm|cutlass|nvjet|xmma|scaled_mm|cublas|\bmm\b|addmm|bmm|matmul|linear|sm90_.*_tn", re.I)
_COMMUNICATION = re.compile(r"nccl", re.I)
_QUANT = re.compile(r"amax.*(clamp|fp8|float8|to_copy|div)|(abs|clamp).*amax|float8|fp8", re.I)


def classify(kernel: str) -> str:
    """The kind of one kernel (or, on a CPU, one aten operator), from its name. Inductor names a
    fused Triton kernel after every op it absorbed, the consumer included (a quantization pass
    feeding `_scaled_mm`, a layout copy feeding attention): only its templates are GEMMs."""
    name = kernel.replace("aten::", " ")
    if _COMMUNICATION.search(name):
        return "communication"
    if name.startswith("triton_"):
        if name.startswith("triton_tem_"):
            return "matmul"
        return "quantization" if _QUANT.search(name) else "other"
    if _ATTENTION.search(name):
        return "attention"
    if _QUANT.search(name) and not _MATMUL.search(name):
        return "quantization"
    if _MATMUL.search(name):
        return "matmul"
    return "other"


def forward_flops(config, tokens: int) -> dict[str, float]:
    """FLOPs of one forward over `tokens` (image + text) tokens, by kind."""
    width = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers
    return {"matmul": 2 * 12 * width**2 * tokens * blocks, "attention": 4 * tokens**2 * width * blocks}


def kernel_times_us(profiler, device: torch.device) -> dict[str, float]:
    """Self time per kernel name, in µs: device kernels on a GPU, leaf operators on a CPU."""
    times: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        if device.type == "cuda":
            if event.device_type == torch.autograd.DeviceType.CUDA:
                times[event.key] += event.self_device_time_total
        elif event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            times[event.key] += event.self_cpu_time_total
    return dict(times)


def summarise(times_us: dict[str, float], repeat: int, flops: dict[str, float], top: int = 10) -> dict:
    per_kind = {kind: 0.0 for kind in KINDS}
    for name, us in times_us.items():
        per_kind[classify(name)] += us / repeat / 1000
    total = sum(per_kind.values())
    tflops = {kind: flops[kind] / (per_kind[kind] / 1000) / 1e12 for kind in flops if per_kind[kind] > 0}
    kernels = sorted(times_us.items(), key=lambda item: -item[1])[:top]
    return {"ms_per_forward": total, "ms": per_kind, "tflops": tflops,
            "top": [(name[:90], classify(name), us / repeat / 1000) for name, us in kernels]}  # fmt: skip


def forward_inputs(transformer, side_patches: int, text: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs of one forward: an output and one reference of side_patches² latent patches each."""
    config = transformer.config
    images = torch.randn(1, 2 * side_patches**2, config.in_channels, device=device, dtype=dtype)
    return {"hidden_states": images,
            "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, device=device, dtype=dtype),
            "encoder_hidden_states_mask": None,  # as the engine passes unpadded text: no mask
            "timestep": torch.tensor([0.5], device=device, dtype=dtype),
            "img_shapes": [[(1, side_patches, side_patches), (1, side_patches, side_patches)]],
            "return_dict": False}  # fmt: skip


def profile(transformer, side_patches: int = 64, text: int = 200, warm: int = 3, repeat: int = 5) -> dict:
    """Profile `repeat` forwards of `transformer` (compiled or not) after `warm` untimed ones."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    parameter = next(transformer.parameters())
    device, dtype = parameter.device, torch.bfloat16 if parameter.device.type == "cuda" else torch.float32
    inputs = forward_inputs(transformer, side_patches, text, device, dtype)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with torch.inference_mode():
        for _ in range(warm):
            transformer(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with torch_profile(activities=activities) as recorded:
            for _ in range(repeat):
                transformer(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
    tokens = 2 * side_patches**2 + text
    summary = summarise(kernel_times_us(recorded, device), repeat, forward_flops(transformer.config, tokens))
    summary["tokens"] = tokens
    summary["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return summary


def markdown(label: str, summary: dict) -> str:
    ms, tflops = summary["ms"], summary["tflops"]
    lines = [f"\n{label} on {summary['device']}: {summary['ms_per_forward']:.1f} ms of kernels per forward, "
             f"S = {summary['tokens']} tokens\n", "| kind | ms per forward | share | achieved TFLOP/s |", "| --- | --- | --- | --- |"]  # fmt: skip
    for kind in KINDS:
        rate = f"{tflops[kind]:.0f}" if kind in tflops else "-"
        lines.append(f"| {kind} | {ms[kind]:.1f} | {ms[kind] / max(summary['ms_per_forward'], 1e-9):.0%} | {rate} |")
    lines += ["", "| top kernel | kind | ms per forward |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {kind} | {value:.2f} |" for name, kind, value in summary["top"]]
    return "\n".join(lines)
