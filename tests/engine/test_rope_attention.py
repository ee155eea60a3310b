"""Real-valued RoPE (`rope_attention`) against diffusers' complex-number attention processor."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qwen_edit_worker.engine import rope_attention
from qwen_edit_worker.testing.tiny_model import TINY_TRANSFORMER

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from forward_profile import forward_inputs  # noqa: E402


class CalledFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def transformers():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    stock = QwenImageTransformer2DModel(**TINY_TRANSFORMER).eval()
    ours = copy.deepcopy(stock)
    rope_attention.install(ours)
    return stock, ours


@pytest.mark.parametrize("text", [1, 7, 30])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_same_output_as_the_complex_path(transformers, text, padded):
    stock, ours = transformers
    inputs = forward_inputs(stock, 4, text, torch.device("cpu"), torch.float32)
    inputs["hidden_states"] = inputs["hidden_states"].repeat(2, 1, 1)  # batch 2: the second sample padded
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].repeat(2, 1, 1) * 3 + 1
    inputs["timestep"] = torch.tensor([0.3, 0.8])
    inputs["img_shapes"] = inputs["img_shapes"] * 2
    if padded:
        mask = torch.ones(2, text, dtype=torch.long)
        mask[1, text // 2 + 1 :] = 0
        inputs["encoder_hidden_states_mask"] = mask
    with torch.inference_mode():
        expected = stock(**inputs)[0]
        actual = ours(**inputs)[0]
    assert float((actual - expected).norm() / expected.norm()) < 1e-6
    assert expected.abs().mean() > 0.1  # a forward that does something


def test_the_blocks_rotate_without_complex_numbers(transformers):
    stock, ours = transformers
    inputs = forward_inputs(stock, 4, 7, torch.device("cpu"), torch.float32)
    for model, complex_expected in ((stock, True), (ours, False)):
        with torch.inference_mode(), CalledFunctions() as called:
            model(**inputs)
        assert ("view_as_complex" in called.names) == complex_expected


def test_rotate_pairs_channels_like_a_complex_product():
    x = torch.randn(1, 5, 2, 8)
    angles = torch.randn(5, 4) * 3
    freqs = torch.polar(torch.ones_like(angles), angles)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs.unsqueeze(1)).flatten(3)
    actual = rope_attention.rotate(x, rope_attention.real_frequencies(freqs))
    assert torch.allclose(actual, expected, atol=1e-6)


def test_install_is_idempotent_and_the_loader_installs_it(transformers, base_holder):
    _, ours = transformers
    hook = ours._real_rope_hook
    rope_attention.install(ours)
    assert ours._real_rope_hook is hook and len(ours.pos_embed._forward_hooks) == 1
    processors = base_holder.get().pipe.transformer.attn_processors.values()
    assert all(isinstance(p, rope_attention.RealRopeAttnProcessor) for p in processors)
