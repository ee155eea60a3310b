"""FlashAttention-3 for the blocks' joint [text, image] attention, where it runs (Hopper GPUs).

`fa3-fwd` ships FlashAttention-3's forward pass as a wheel (`fa3_fwd_interface`), built for
sm90 in bfloat16, with its operator registered for torch.compile. For one 1024² edit's
attention on an H100 (B=1, 8392 tokens, 24 heads of 128) it takes 1.34 ms where PyTorch's
SDPA (cuDNN) takes 1.47, and 2.81 against 4.45 ms for two samples with a padded text
(`benchmarks/attention_kernels.py`, BENCHMARKS.md).

FA3 takes no mask, and a batch of prompts of unequal length pads the shorter texts, whose
padding sits between the text and the image in the blocks' [text, image] order. Attention does
not depend on the order of the keys, so the keys and values go in as [image, text]: each
sample's padding is then at its end, and FA3's `seqused_k` (how many keys each sample uses,
from the first) leaves it out. The queries stay [text, image], so the output is in the order
the block expects. This needs the text mask to be ones then zeros, as the pipeline pads
prompts (at the end).

`ATTENTION_BACKEND=auto` (the default) uses it where `unavailable_reason` finds nothing in the
way, and PyTorch's SDPA elsewhere; `fa3` asks for it and stops the worker at start where it
cannot run.
"""

from __future__ import annotations

import functools
import logging

import torch

from config import WORKER_ATTENTION

log = logging.getLogger("qwen_edit_worker.engine")

HOPPER = (9, 0)  # the one architecture the wheel is built for
HEAD_DIMS = (64, 96, 128, 192, 256)


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int = 128) -> str | None:
    """Why FlashAttention-3 cannot run here (one clause), or None where it can."""
    if device.type != "cuda":
        return "it needs a CUDA GPU"
    if torch.cuda.get_device_capability(device) != HOPPER:
        return f"it runs on Hopper GPUs (H100, H200) and this is {torch.cuda.get_device_name(device)}"
    if dtype != torch.bfloat16:
        return f"it runs in bfloat16 and the model runs in {str(dtype).removeprefix('torch.')}"
    if head_dim not in HEAD_DIMS:
        return f"it takes heads of {', '.join(map(str, HEAD_DIMS))} channels, not {head_dim}"
    try:
        import fa3_fwd_interface  # noqa: F401 - registers its operator
    except (ImportError, OSError):  # not installed, or its CUDA library does not load
        return "the fa3-fwd package does not import"
    return None


def keys_in_order(txt: tuple, img: tuple, text_mask: torch.Tensor | None):
    """The queries as [text, image], the keys and values as [image, text], and the keys each
    sample uses (None where no text is padded), from (q, k, v) of each stream, [B, L|S, H, D]."""
    (txt_q, txt_k, txt_v), (img_q, img_k, img_v) = txt, img
    q = torch.cat([txt_q, img_q], dim=1)
    k = torch.cat([img_k, txt_k], dim=1)
    v = torch.cat([img_v, txt_v], dim=1)
    used = None if text_mask is None else (text_mask.sum(dim=1) + img_k.shape[1]).to(torch.int32)
    return q, k, v, used


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys_used: torch.Tensor | None) -> torch.Tensor:
    """FA3 over [B, S, H, D]; each sample attends to its first `keys_used` keys (all where None)."""
    from fa3_fwd_interface import _flash_attn_forward

    return _flash_attn_forward(q, k, v, seqused_k=keys_used, softmax_scale=q.shape[-1] ** -0.5, causal=False,
                               window_size_left=-1, window_size_right=-1)[0]  # fmt: skip


def use(transformer, setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Set every block of `transformer` (after `rope_attention.install`) to FlashAttention-3
    where ATTENTION_BACKEND (`setting`) is `auto` or `fa3` and it runs here, and to the
    configured backend otherwise; one log line saying which. True where they use FA3."""
    flash = setting in WORKER_ATTENTION and _available(transformer, setting, device, dtype)
    for processor in transformer.attn_processors.values():
        if hasattr(processor, "flash"):  # rope_attention.RealRopeAttnProcessor
            processor.flash = flash
    return flash


def _available(transformer, setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    reason = unavailable_reason(device, dtype, transformer.config.attention_head_dim)
    if reason is not None:
        if setting == "fa3":  # the start-up check saw the GPU; this model's heads may still not fit
            raise RuntimeError(f"ATTENTION_BACKEND=fa3 cannot be used: {reason}")
        _say_once(f"attention: PyTorch SDPA (FlashAttention-3 is not used: {reason})")
        return False
    _say_once("attention: FlashAttention-3 (fa3-fwd)")
    return True


@functools.cache
def _say_once(line: str) -> None:
    """Logged once per process: a worker that compiles on a stand-in first shapes two transformers."""
    log.info(line)


def joint_attention(txt: tuple, img: tuple, text_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention over [text, image], [B, L + S, H, D], through FA3 (`keys_in_order`)."""
    return attend(*keys_in_order(txt, img, text_mask))
