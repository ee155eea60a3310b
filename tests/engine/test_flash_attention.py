"""FlashAttention-3's key order and its choice (`flash_attention`), on the CPU.

FA3 itself runs on Hopper GPUs only (`benchmarks/attention_kernels.py` compares it with SDPA
there). Here `keys_used_attention` stands in for it with FA3's semantics of `seqused_k` (each
sample attends to its first `keys_used` keys), so that the layout that makes a padded text
need no mask is checked against the masked SDPA path, on the tiny transformer.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, Settings
from qwen_edit_worker import startup_checks
from qwen_edit_worker.engine import flash_attention, rope_attention
from qwen_edit_worker.testing.tiny_model import TINY_TRANSFORMER

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from forward_profile import forward_inputs  # noqa: E402


def keys_used_attention(q, k, v, keys_used):
    """What FA3 computes from [B, S, H, D] with `seqused_k`, in plain SDPA."""
    mask = None
    if keys_used is not None:
        mask = (torch.arange(k.shape[1]) < keys_used[:, None])[:, None, None, :]  # [B, 1, 1, K]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.fixture
def flash_on_cpu(monkeypatch):
    monkeypatch.setattr(flash_attention, "attend", keys_used_attention)


def streams(batch: int, text: int, image: int, heads: int = 2, dim: int = 8):
    torch.manual_seed(0)
    return tuple(tuple(torch.randn(batch, length, heads, dim) for _ in "qkv") for length in (text, image))


@pytest.mark.parametrize("lengths", [(7, 7), (7, 3), (1, 7)], ids=["unpadded", "padded", "one-token"])
def test_keys_after_the_image_leave_a_padded_text_out_as_the_mask_does(lengths, flash_on_cpu):
    txt, img = streams(2, max(lengths), 12)
    text_mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths], dtype=torch.bool)  # as the blocks get it
    q, k, v, used = flash_attention.keys_in_order(txt, img, text_mask)
    assert used.tolist() == [12 + n for n in lengths] and used.dtype == torch.int32
    masked = rope_attention.RealRopeAttnProcessor().attend(txt, img, text_mask)  # SDPA with the joint mask
    assert torch.allclose(flash_attention.joint_attention(txt, img, text_mask), masked, atol=1e-6)
    # the same keys without the padding left out give another result: the test can tell
    if lengths[0] != lengths[1]:
        assert not torch.allclose(keys_used_attention(q, k, v, None), masked, atol=1e-3)


def test_the_tiny_transformer_with_fa3_order_gives_the_sdpa_result_for_padded_batches(flash_on_cpu):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    sdpa = QwenImageTransformer2DModel(**TINY_TRANSFORMER).eval()
    rope_attention.install(sdpa)
    flash = copy.deepcopy(sdpa)
    for processor in flash.attn_processors.values():
        processor.flash = True
    inputs = forward_inputs(sdpa, 4, 9, torch.device("cpu"), torch.float32)
    inputs.update(hidden_states=inputs["hidden_states"].repeat(2, 1, 1), timestep=torch.tensor([0.3, 0.8]),
                  encoder_hidden_states=torch.randn(2, 9, sdpa.config.joint_attention_dim),
                  encoder_hidden_states_mask=torch.tensor([[1] * 9, [1] * 4 + [0] * 5]), img_shapes=inputs["img_shapes"] * 2)  # fmt: skip
    with torch.inference_mode():
        expected, actual = sdpa(**inputs)[0], flash(**inputs)[0]
    assert float((actual - expected).norm() / expected.norm()) < 1e-6


def test_auto_falls_back_to_sdpa_with_one_line_where_fa3_cannot_run(caplog):
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    rope_attention.install(transformer)
    flash_attention._say_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="qwen_edit_worker.engine"):
        for _ in range(2):  # a stand-in, then the transformer: one line
            assert flash_attention.use(transformer, "auto", torch.device("cpu"), torch.float32) is False
        assert flash_attention.use(transformer, "native", torch.device("cpu"), torch.float32) is False
    lines = [r.getMessage() for r in caplog.records if "attention:" in r.getMessage()]
    assert lines == ["attention: PyTorch SDPA (FlashAttention-3 is not used: it needs a CUDA GPU)"]
    assert not any(p.flash for p in transformer.attn_processors.values())
    with pytest.raises(RuntimeError, match="^ATTENTION_BACKEND=fa3 cannot be used: it needs a CUDA GPU$"):
        flash_attention.use(transformer, "fa3", torch.device("cpu"), torch.float32)


def test_use_sets_every_block_to_the_attention_it_chose(monkeypatch):
    """Where FA3 runs, `auto` and `fa3` put it in every block; another setting takes it out again
    (gpu_speed.py shapes one transformer for variants with different attention)."""
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    rope_attention.install(transformer)
    monkeypatch.setattr(flash_attention, "unavailable_reason", lambda *args: None)
    for setting, flash in (("auto", True), ("native", False), ("fa3", True), ("_native_cudnn", False)):
        assert flash_attention.use(transformer, setting, torch.device("cuda"), torch.bfloat16) is flash
        assert [p.flash for p in transformer.attn_processors.values()] == [flash] * TINY_TRANSFORMER["num_layers"]


def test_fa3_is_chosen_on_hopper_in_bfloat16_where_the_package_loads(monkeypatch):
    """The decision on a GPU, with torch's answers about the GPU given: FA3 only on sm90, in
    bfloat16, with a head size it was built for, and only where the package imports."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert flash_attention.unavailable_reason(cuda, torch.bfloat16) == (
        "it runs on Hopper GPUs (H100, H200) and this is NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert flash_attention.unavailable_reason(cuda, torch.float16) == "it runs in bfloat16 and the model runs in float16"
    assert flash_attention.unavailable_reason(cuda, torch.bfloat16, head_dim=80) == (
        "it takes heads of 64, 96, 128, 192, 256 channels, not 80")
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", None)  # not installed: import fails
    assert flash_attention.unavailable_reason(cuda, torch.bfloat16) == "the fa3-fwd package does not import"
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", type(sys)("fa3_fwd_interface"))
    assert flash_attention.unavailable_reason(cuda, torch.bfloat16) is None


def test_asking_for_fa3_where_it_cannot_run_stops_the_worker_at_start(tiny_env):
    settings = Settings.from_env(tiny_env(ATTENTION_BACKEND="fa3"))
    with pytest.raises(ConfigError) as stopped:
        startup_checks.check_device(settings)
    assert str(stopped.value) == ("ATTENTION_BACKEND=fa3 cannot be used here: it needs a CUDA GPU; use auto "
                                  "(FlashAttention-3 where it runs, PyTorch's SDPA elsewhere) or native.")  # fmt: skip
    startup_checks.check_device(Settings.from_env(tiny_env()))  # auto: the default, falls back


def test_auto_and_fa3_take_padded_texts():
    assert Settings.from_env({}).attention_backend == "auto"
    for backend in ("auto", "fa3"):
        assert Settings.from_env({"ATTENTION_BACKEND": backend, "CFG_BATCHING": "true"}).attention_takes_masks
