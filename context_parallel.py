"""One transformer forward across several GPUs: Ulysses over the image tokens, the text whole on every rank.

diffusers' context-parallel plan for this transformer splits the text tokens as it splits the
image tokens, so a prompt whose length is not a multiple of the GPU count needs its
`ulysses_anything` mode, which gathers the split sizes with `.item()` in every attention call:
a synchronisation and a graph break per call (slower than one GPU, measured on two H200s).
Here only the image tokens are split. Their count is a multiple of 4 for every size the
worker makes (sides are multiples of 32 pixels, 16 pixels a token), while every rank keeps
the whole text (about 200 tokens against 8192 image tokens at 1024²) and projects it itself.
In each attention:

- the image queries, keys and values go through Ulysses' all-to-all: each rank then holds
  every image token for 1/N of the heads;
- the text's are sliced to the same heads where they are, with no communication;
- after attention the image part goes back by the reverse all-to-all and the text part is
  all-gathered over the heads, so that every rank again holds the whole text.

Every size is known on the host, so the compiled block stays one graph with no `.item()`.
The image tokens are split after `img_in`, their rotary frequencies after `pos_embed`, and
the output is gathered after `proj_out`; all of that is hooks around the compiled blocks.
The collectives are torch's functional ones, which dynamo traces (NCCL on GPUs, gloo on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import rope_attention


@dataclass(frozen=True)
class Ranks:
    """The ranks one forward runs across (the default process group's, in order). On rank 0,
    `announce(call)` tells the other ranks about a forward before it runs, and `tell(kind,
    payload)` about a change of the LoRAs (`context_ranks`)."""

    rank: int
    size: int
    group: dist.ProcessGroup
    announce: Callable[[dict], None] | None = None
    tell: Callable[[str, object], None] | None = None

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's equal share of `x` along `dim`."""
        if x.shape[dim] % self.size:
            raise ValueError(f"{x.shape[dim]} image tokens cannot be split over {self.size} GPUs")
        return x.chunk(self.size, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x`, concatenated along `dim` in rank order."""
        # all_gather_tensor, not all_gather_single: the latter is newer than torch 2.11
        stacked = funcol.all_gather_tensor(x.contiguous(), 0, self.group)  # [N * B, ...] in rank order
        return torch.cat(stacked.chunk(self.size, dim=0), dim=dim)

    def joint_attention(self, attend, txt: tuple, img: tuple, text_mask: torch.Tensor | None):
        return joint_attention(attend, txt, img, text_mask, self)


def heads_to_sequence(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """[B, S/N, H, D] (this rank's tokens, every head) to [B, S, H/N, D] (every token, this rank's heads)."""
    batch, tokens, heads, dim = x.shape
    parts = x.reshape(batch, tokens, ranks.size, heads // ranks.size, dim).permute(2, 0, 1, 3, 4).contiguous()
    received = funcol.all_to_all_single(parts, None, None, group=ranks.group)  # [N (source: tokens), B, S/N, H/N, D]
    return received.permute(1, 0, 2, 3, 4).reshape(batch, ranks.size * tokens, heads // ranks.size, dim)


def sequence_to_heads(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The inverse of `heads_to_sequence`."""
    batch, tokens, heads, dim = x.shape
    parts = x.reshape(batch, ranks.size, tokens // ranks.size, heads, dim).permute(1, 0, 2, 3, 4).contiguous()
    received = funcol.all_to_all_single(parts, None, None, group=ranks.group)  # [N (source: heads), B, S/N, H/N, D]
    return received.permute(1, 2, 0, 3, 4).reshape(batch, tokens // ranks.size, ranks.size * heads, dim)


def own_heads(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's heads of [B, L, H, D]."""
    return x.chunk(ranks.size, dim=2)[ranks.rank]


def all_heads(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """[B, L, H/N, D] from every rank to [B, L, H, D]."""
    return ranks.gather(x, dim=2)


def joint_attention(attend, txt: tuple, img: tuple, text_mask: torch.Tensor | None, ranks: Ranks):
    """Attention over [text, image] with the image split across `ranks`: the text's and this
    rank's image tokens' outputs, [B, L, H, D] and [B, S/N, H, D]. `attend(q, k, v, mask)` is
    the single-GPU attention on [B, S, H, D] tensors."""
    txt_q, txt_k, txt_v = (own_heads(t, ranks) for t in txt)
    img_q, img_k, img_v = (heads_to_sequence(t, ranks) for t in img)
    mask = rope_attention.joint_mask(text_mask, img_q.shape[1])
    joint = attend(torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1), torch.cat([txt_v, img_v], dim=1),
                   mask)  # fmt: skip
    length = txt_q.shape[1]
    return all_heads(joint[:, :length], ranks), sequence_to_heads(joint[:, length:], ranks)


def enable(transformer, ranks: Ranks) -> None:
    """Run `transformer`'s forwards across `ranks` (every rank calls it with the same inputs
    and gets the whole output). Needs `rope_attention.install` first; once per transformer."""
    if ranks.size < 2:
        return
    if getattr(transformer.config, "zero_cond_t", False):
        raise ValueError("context parallelism does not handle zero_cond_t transformers")
    if transformer.config.num_attention_heads % ranks.size:
        raise ValueError(f"{transformer.config.num_attention_heads} attention heads cannot be split over {ranks.size} GPUs")
    if getattr(transformer, "_real_rope_hook", None) is None:
        raise RuntimeError("context parallelism needs rope_attention.install first")
    for processor in transformer.attn_processors.values():
        if isinstance(processor, rope_attention.RealRopeAttnProcessor):
            processor.ranks = ranks
    transformer.img_in.register_forward_hook(lambda module, args, out: ranks.split(out, dim=1))
    transformer.pos_embed.register_forward_hook(lambda module, args, out: (ranks.split(out[0], dim=0), out[1]))
    transformer.proj_out.register_forward_hook(lambda module, args, out: ranks.gather(out, dim=1))
