"""PRECISION_MODE=fp8: torchao float8 for the transformer blocks' token-wise linears.

The recipe is the validated one for Qwen-Image (SGLang's ModelOpt fp8 recipe): float8
weights and dynamic per-row float8 activations for the linears every token passes (q, k, v,
the output projections and the MLPs), while these stay in bf16:

- everything outside the blocks: `img_in`, `txt_in`, `proj_out`, the timestep embedding and
  `norm_out`;
- the AdaLN modulation layers `img_mod` / `txt_mod`: they run on one row per sample (the
  timestep), where float8 cannot speed anything up, and they steer every token's scale and shift;
- the image MLP's down-projection `img_mlp.net.2`, the layer most sensitive to float8 (the
  latents' range drifts across timesteps and no norm holds it).

BENCHMARKS.md has what each exclusion costs in speed.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

log = logging.getLogger("qwen_edit_worker.model")

# Suffixes of the linears inside a block that stay in bf16 (the recipe's list).
KEPT_IN_BF16 = (".img_mod.1", ".txt_mod.1", ".img_mlp.net.2")
BLOCKS = "transformer_blocks."


def in_recipe(kept: tuple[str, ...] = KEPT_IN_BF16) -> Callable[[torch.nn.Module, str], bool]:
    """torchao's `filter_fn`: whether the module called `name` is quantized. `kept` lets the
    benchmarks measure other sets (an empty tuple: every linear of the blocks)."""

    def quantized(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.startswith(BLOCKS) and not name.endswith(kept)

    return quantized


def config():
    """torchao's float8 weights with dynamic per-row float8 activations. `set_inductor_config`
    off: torchao's default turns on inductor's coordinate-descent tuning for the whole process,
    which benchmarks every Triton kernel's configurations while compiling; one transformer
    block's graph then took 228 s to compile instead of 13 (BENCHMARKS.md)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def quantize(transformer: torch.nn.Module, kept: tuple[str, ...] = KEPT_IN_BF16) -> None:
    """Quantize `transformer` in place to the recipe (or with `kept` left in bf16 instead)."""
    from torchao.quantization import quantize_

    start = time.perf_counter()
    quantize_(transformer, config(), filter_fn=in_recipe(kept))
    log.info("transformer quantized to fp8 (torchao, per-row dynamic; %s kept in bf16) in %.1f s",
             ", ".join(k.strip(".") for k in kept) or "nothing", time.perf_counter() - start)  # fmt: skip
