"""Qwen-Image's joint attention with RoPE in real arithmetic, so that torch.compile fuses it.

diffusers' `QwenDoubleStreamAttnProcessor2_0` rotates queries and keys as complex numbers
(`view_as_complex`, a complex product, `view_as_real`). Inductor does not generate code for
complex tensors: those run as separate aten kernels, four per block, 240 per forward (9.4 ms
of a 322 ms compiled forward on an H100), and they cut the q/k norm off from everything after
it. The same rotation written on (cos, sin) pairs, (a + ib)(c + is) = (ac − bs) + i(as + bc),
is plain elementwise work that inductor fuses with the RMSNorm before it and the text/image
concatenation after it.

`install` swaps every block's processor for `RealRopeAttnProcessor` and makes the transformer's
`pos_embed` hand the blocks (cos | sin) as one real [S, head_dim] tensor per stream: the same
layout along the sequence, so diffusers' context-parallel plan still splits it on dim 0.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from qwen_edit_worker.engine import flash_attention


def real_frequencies(freqs: torch.Tensor) -> torch.Tensor:
    """Complex [S, D/2] rotations as real [S, D]: the cosines, then the sines."""
    return torch.cat((freqs.real, freqs.imag), dim=-1).float()


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate [B, S, H, D] by `real_frequencies` [S, D], pairing channels (0, 1), (2, 3), ... as
    diffusers' complex path does; in float32, returned in x's dtype. Written as
    x·cos + swap(x)·(−sin, sin), with swap exchanging each pair: one load pattern per output,
    which inductor turns into a tighter kernel than stacking the two halves (measured)."""
    cos, sin = freqs.unsqueeze(1).chunk(2, dim=-1)  # [S, 1, D/2] each
    cos = cos.repeat_interleave(2, dim=-1)
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
    pairs = x.float()
    swapped = pairs.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (pairs * cos + swapped * sin).type_as(x)


def _as_real(module: torch.nn.Module, args, output: tuple[torch.Tensor, torch.Tensor]):
    """Forward hook of `pos_embed`: its (image, text) complex frequencies as real tensors."""
    return tuple(real_frequencies(freqs) for freqs in output)


class RealRopeAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """`QwenDoubleStreamAttnProcessor2_0` with `rotate` in place of the complex RoPE; the same
    projections, norms, mask, order ([text, image]) and attention dispatch (backends). Anything
    else (complex frequencies, an external mask) goes to the original. With `ranks` set
    (`context_parallel.enable`), the image tokens are split across GPUs."""

    ranks = None  # context_parallel.Ranks
    flash = False  # FlashAttention-3 (`flash_attention.use`)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):  # fmt: skip
        if encoder_hidden_states is None or attention_mask is not None or not _real(image_rotary_emb):
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)  # fmt: skip
        img_freqs, txt_freqs = image_rotary_emb
        head_dim = attn.inner_dim // attn.heads
        img = _stream(hidden_states, head_dim, img_freqs, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        txt = _stream(encoder_hidden_states, head_dim, txt_freqs, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                      attn.norm_added_q, attn.norm_added_k)  # fmt: skip
        if self.ranks is not None:
            txt_out, img_out = self.ranks.joint_attention(self.attend, txt, img, encoder_hidden_states_mask)
        else:
            joint = self.attend(txt, img, encoder_hidden_states_mask)
            txt_out, img_out = joint[:, : encoder_hidden_states.shape[1]], joint[:, encoder_hidden_states.shape[1] :]
        img_out = attn.to_out[0](img_out.flatten(2, 3).to(img[0].dtype).contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, attn.to_add_out(txt_out.flatten(2, 3).to(img[0].dtype).contiguous())

    def attend(self, txt: tuple, img: tuple, text_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over [text, image], [B, L + S, H, D], from each stream's (q, k, v),
        [B, L|S, H, D]: FlashAttention-3 where `flash_attention.use` set it, else diffusers'
        dispatch (the configured backend) with the padded text masked."""
        if self.flash:
            return flash_attention.joint_attention(txt, img, text_mask)
        q, k, v = (torch.cat([t, i], dim=1) for t, i in zip(txt, img))
        mask = joint_mask(text_mask, img[0].shape[1])
        return dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend)


def joint_mask(text_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
    """The [B, 1, 1, L + S] mask of [text, image] for a padded text; None for none."""
    if text_mask is None:
        return None
    image_mask = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask, image_mask], dim=1)[:, None, None, :]


def _real(rotary) -> bool:
    return rotary is not None and not rotary[0].is_complex()


def _stream(x, head_dim, freqs, to_q, to_k, to_v, norm_q, norm_k):
    """One stream's queries, keys and values, [B, S, H, D]: normalised and rotated."""
    q, k, v = (project(x).unflatten(-1, (-1, head_dim)) for project in (to_q, to_k, to_v))
    q = norm_q(q) if norm_q is not None else q
    k = norm_k(k) if norm_k is not None else k
    return rotate(q, freqs), rotate(k, freqs), v


def install(transformer) -> None:
    """Real-valued RoPE in every block of `transformer` (once; later calls do nothing)."""
    if getattr(transformer, "_real_rope_hook", None) is not None:
        return
    transformer.set_attn_processor({name: RealRopeAttnProcessor() for name in transformer.attn_processors})
    transformer._real_rope_hook = transformer.pos_embed.register_forward_hook(_as_real)
