"""PRECISION_MODE=fp8's recipe: which linears torchao quantizes, and its settings.

float8 kernels need a GPU, so the quantization itself is measured on one
(`benchmarks/gpu_speed.py --profile`); here the choice of layers and the config are checked
on the tiny transformer, which has every layer name of the real one.
"""

from __future__ import annotations

import torch

from qwen_edit_worker.engine import fp8
from qwen_edit_worker.testing.tiny_model import TINY_TRANSFORMER


def _linears() -> dict[str, torch.nn.Module]:
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    return {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def test_the_recipe_quantizes_the_token_linears_of_the_blocks_only():
    linears = _linears()
    chosen = {name for name, module in linears.items() if fp8.in_recipe()(module, name)}
    per_block = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.0.proj", "txt_mlp.net.2"}  # fmt: skip
    assert chosen == {f"transformer_blocks.{b}.{name}" for b in range(TINY_TRANSFORMER["num_layers"]) for name in per_block}
    kept = set(linears) - chosen
    for name in ("img_in", "txt_in", "proj_out", "norm_out.linear", "transformer_blocks.0.img_mod.1",
                 "transformer_blocks.1.txt_mod.1", "transformer_blocks.1.img_mlp.net.2"):  # fmt: skip
        assert name in kept


def test_other_sets_can_be_measured():
    linears = _linears()
    every = {name for name, module in linears.items() if fp8.in_recipe(())(module, name)}
    assert every == {name for name in linears if name.startswith("transformer_blocks.")}
    assert not fp8.in_recipe()(torch.nn.LayerNorm(4), "transformer_blocks.0.img_norm1")


def test_fp8_leaves_inductor_settings_alone():
    """torchao's default would switch on coordinate-descent tuning for every later compile."""
    import torch._inductor.config as inductor

    config = fp8.config()
    assert config.set_inductor_config is False
    before = inductor.coordinate_descent_tuning
    layer = torch.nn.Sequential(torch.nn.Linear(32, 32, dtype=torch.bfloat16))
    try:
        from torchao.quantization import quantize_

        quantize_(layer, config)  # on a CPU torchao refuses float8 after its settings step
    except AssertionError:
        pass
    assert inductor.coordinate_descent_tuning == before is False
