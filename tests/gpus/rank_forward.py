"""What each rank of the context-parallel tests runs (`torch.multiprocessing.spawn`): the tiny
transformer's forwards alone and then split across the ranks, the errors between them written
to a file. In a module of its own, which a spawned rank imports: the test module's imports
(the RunPod stand-in, the handler's tests) would cost every rank seconds for nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

LENGTHS = (7, 13, 20)  # odd, prime, even: none needs to divide among the ranks


def inputs(transformer) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from forward_profile import forward_inputs

    torch.manual_seed(0)
    cases = [forward_inputs(transformer, 4, length, torch.device("cpu"), torch.float32) for length in LENGTHS]
    batch = forward_inputs(transformer, 4, 11, torch.device("cpu"), torch.float32)  # two prompts, one padded
    batch.update(hidden_states=batch["hidden_states"].repeat(2, 1, 1), timestep=batch["timestep"].repeat(2),
                 encoder_hidden_states=torch.randn(2, 11, transformer.config.joint_attention_dim),
                 encoder_hidden_states_mask=torch.tensor([[1] * 11, [1] * 6 + [0] * 5]), img_shapes=batch["img_shapes"] * 2)  # fmt: skip
    # A size whose image tokens divide by no GPU count: a 5x5 output beside a 4x4 reference (41
    # tokens; 11 + 10 + 10 + 10 on four ranks), two such samples with a padded text.
    odd = forward_inputs(transformer, 4, 9, torch.device("cpu"), torch.float32)
    odd.update(hidden_states=torch.randn(2, 41, transformer.config.in_channels), timestep=odd["timestep"].repeat(2),
               encoder_hidden_states=torch.randn(2, 9, transformer.config.joint_attention_dim),
               encoder_hidden_states_mask=torch.tensor([[1] * 9, [1] * 4 + [0] * 5]),
               img_shapes=[[(1, 5, 5), (1, 4, 4)]] * 2)  # fmt: skip
    return [*cases, batch, odd]


def rank_forward(rank: int, world: int, store: str, path: str | None, compiled: bool, results: str, flash: bool = False) -> None:
    import torch.distributed as dist
    from diffusers import QwenImageTransformer2DModel
    from torch._dynamo.utils import counters

    from qwen_edit_worker.engine import compilation, context_parallel, flash_attention, rope_attention
    from qwen_edit_worker.testing.tiny_model import TINY_TRANSFORMER
    from tests.engine.test_flash_attention import keys_used_attention

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if path is None:  # two heads per rank, from the same seed on every rank
        torch.manual_seed(0)
        transformer = QwenImageTransformer2DModel(**dict(TINY_TRANSFORMER, num_attention_heads=2 * world)).float().eval()
    else:
        transformer = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer").float().eval()
    rope_attention.install(transformer)
    cases = inputs(transformer)
    with torch.inference_mode():
        alone = [transformer(**case)[0] for case in cases]
        context_parallel.enable(transformer, context_parallel.Ranks(rank, world, dist.group.WORLD))
        if flash:  # FA3's key order on this rank's heads, FA3 itself in SDPA (it runs on Hopper only)
            flash_attention.attend = keys_used_attention
            for processor in transformer.attn_processors.values():
                processor.flash = True
        if compiled:  # as the worker does (`compilation.compile_transformer`): lengths symbolic
            torch._dynamo.config.recompile_limit = 64
            transformer.compile_repeated_blocks(fullgraph=True)
            compilation.sequences_dynamic(transformer)
        split = [transformer(**case)[0] for case in cases]
    errors = [float((b - a).norm() / a.norm()) for a, b in zip(alone, split)]
    with open(f"{results}.{rank}", "w") as out:
        json.dump({"errors": errors, "breaks": sum(counters["graph_break"].values()),
                   "graphs": counters["stats"]["unique_graphs"]}, out)  # fmt: skip
    dist.destroy_process_group()
