"""One transformer forward across several GPUs: Ulysses over the image tokens, the text whole on every rank.

diffusers' context-parallel plan for this transformer splits the text tokens as it splits the
image tokens, so a prompt whose length is not a multiple of the GPU count needs its
`ulysses_anything` mode, which gathers the split sizes with `.item()` in every attention call:
a synchronisation and a graph break per call (slower than one GPU, measured on two H200s).
Here only the image tokens are split, while every rank keeps the whole text (about 200
tokens against 8192 image tokens at 1024²) and projects it itself. The image tokens' count
need not divide by the GPU count (a 1040×1040 output has 65² of them, and 3 GPUs divide
few sizes): the first ranks then hold one token more, and each exchange pads the shorter
shares to the longest with zeros and drops the padding on arrival, so that attention sees
exactly the real tokens (no mask, no change to any result). In each attention:

- the image queries, keys and values go through Ulysses' all-to-all, stacked into one: each
  rank then holds every image token for 1/N of the heads;
- the text's are sliced to the same heads where they are, with no communication;
- after attention one more all-to-all sends each rank its image tokens' outputs with the
  text's behind them, so that every rank again holds its image tokens and the whole text.

Two collectives per block (there were five: one per tensor and a gather of the text). On two
H200s that changed nothing measurable (a forward 184 ms against 182, ×1.67 against ×1.66 of
one GPU): their count is not what costs.

Every size is known on the host, so the compiled block stays one graph with no `.item()`.
The image tokens are split after `img_in`, their rotary frequencies after `pos_embed`, and
the output is gathered after `proj_out`; all of that is hooks around the compiled blocks.
The collectives are torch's functional ones, which dynamo traces (NCCL on GPUs, gloo on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from qwen_edit_worker.engine import rope_attention
from qwen_edit_worker.loras.adapters import AdapterCache, AppliedLora


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
    # The image tokens of the forward under way ("tokens"), set where they are split: every
    # exchange after that needs the other ranks' shares, which its shapes cannot tell.
    forward: dict = field(default_factory=dict, compare=False, hash=False)

    def shares(self) -> list[int]:
        """Each rank's count of the forward's image tokens: the first ones one more where they do not divide."""
        tokens = self.forward["tokens"]
        return [tokens // self.size + (rank < tokens % self.size) for rank in range(self.size)]

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of `x`'s image tokens along `dim` (the first ranks one more where
        they do not divide), in a tensor of its own. A view of the whole would reach the first
        block with a storage offset (on every rank but the first) and strides (of more than one
        sample) that the later blocks' inputs do not have: dynamo would compile the one
        regional graph again for each, on every new size."""
        self.forward["tokens"] = x.shape[dim]
        return x.tensor_split(self.size, dim=dim)[self.rank].clone(memory_format=torch.contiguous_format)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x`, concatenated along `dim` in rank order."""
        shares = self.shares()
        # all_gather_tensor, not all_gather_single: the latter is newer than torch 2.11
        stacked = funcol.all_gather_tensor(_padded(x, dim, shares[0]).contiguous(), 0, self.group)  # [N * B, ...] in rank order
        return torch.cat([part.narrow(dim, 0, share) for part, share in zip(stacked.chunk(self.size, dim=0), shares)], dim=dim)

    def joint_attention(self, attend, txt: tuple, img: tuple, text_mask: torch.Tensor | None):
        return joint_attention(attend, txt, img, text_mask, self)


def _padded(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """`x` with zeros after its end along `dim`, to `length`."""
    short = length - x.shape[dim]
    if short == 0:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:dim], short, *x.shape[dim + 1 :])], dim=dim)


def heads_to_sequence(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """[..., B, S/N, H, D] (this rank's tokens, every head) to [..., B, S, H/N, D] (every token,
    this rank's heads): one all-to-all for whatever the leading dimensions stack (q, k and v)."""
    shares, n = ranks.shares(), ranks.size
    x = _padded(x, x.dim() - 3, shares[0])  # every rank sends the longest share
    *lead, batch, share, heads, dim = x.shape
    parts = x.reshape(*lead, batch, share, n, heads // n, dim).movedim(-3, 0).contiguous()  # [N (dest), ..., B, S/N, H/N, D]
    received = funcol.all_to_all_single(parts, None, None, group=ranks.group)  # [N (source: tokens), ...]
    if shares[-1] == share:  # no padding to drop
        return received.movedim(0, -4).reshape(*lead, batch, n * share, heads // n, dim)
    return torch.cat([part.narrow(-3, 0, real) for part, real in zip(received.unbind(0), shares)], dim=-3)


def back_to_ranks(img: torch.Tensor, txt: torch.Tensor, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention outputs for this rank's heads, image [B, S, H/N, D] and text [B, L, H/N, D], to
    this rank's image tokens with every head, [B, S/N, H, D], and the whole text, [B, L, H, D].
    One all-to-all: each rank is sent its image tokens with the text behind them, which
    gathers the text over the heads on the way."""
    shares, n = ranks.shares(), ranks.size
    share = shares[0]
    if shares[-1] == share:
        batch, _, heads, dim = img.shape
        per_rank = img.reshape(batch, n, share, heads, dim).movedim(1, 0)  # [N (dest), B, S/N, H/N, D]
    else:  # each rank's tokens padded to the longest share
        per_rank = torch.stack([_padded(part, 1, share) for part in img.split(shares, dim=1)])
    parts = torch.cat([per_rank, txt.expand(n, *txt.shape)], dim=2).contiguous()  # text behind each rank's tokens
    received = funcol.all_to_all_single(parts, None, None, group=ranks.group)  # [N (source: heads), B, S/N + L, H/N, D]
    whole = received.movedim(0, 2).flatten(2, 3)  # [B, S/N + L, H, D]: the sources' heads in rank order
    return whole[:, : shares[ranks.rank]], whole[:, share:]


def own_heads(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's heads of [B, L, H, D]."""
    return x.chunk(ranks.size, dim=2)[ranks.rank]


def joint_attention(attend, txt: tuple, img: tuple, text_mask: torch.Tensor | None, ranks: Ranks):
    """Attention over [text, image] with the image split across `ranks`: the text's and this
    rank's image tokens' outputs, [B, L, H, D] and [B, S/N, H, D]. `attend(txt, img, text_mask)`
    is the single-GPU joint attention (`RealRopeAttnProcessor.attend`) on this rank's heads.
    Two collectives: the image's q, k and v go out stacked, the image's and the text's outputs
    come back together."""
    txt = tuple(own_heads(t, ranks) for t in txt)
    img = tuple(heads_to_sequence(torch.stack(img), ranks).unbind(0))
    joint = attend(txt, img, text_mask)
    length = txt[0].shape[1]
    img_out, txt_out = back_to_ranks(joint[:, length:], joint[:, :length], ranks)
    return txt_out, img_out


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


def lead(model, ranks: Ranks, capacity: int) -> None:
    """On rank 0: every call of `model`'s transformer, and every change of its LoRAs, is told
    to the followers before it happens."""
    if ranks.announce is None:
        return
    model.pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: ranks.announce(kwargs), with_kwargs=True)
    model.adapters = MirroredAdapters(capacity, ranks.tell)


class MirroredAdapters(AdapterCache):
    """Rank 0's LoRAs: each change is told to the followers first, which make it themselves."""

    def __init__(self, capacity: int, tell):
        super().__init__(capacity)
        self._tell = tell

    def apply(self, model, loras: tuple[AppliedLora, ...]) -> None:
        self._tell("apply", loras)
        super().apply(model, loras)

    def use_slots(self, model, count: int) -> None:
        self._tell("slots", count)
        super().use_slots(model, count)
