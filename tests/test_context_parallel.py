"""One transformer forward across two ranks on gloo (the CPU stand-in for NCCL): the same
result as one process, for any text length, compiled as one graph."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_handler import ROOT

LENGTHS = (7, 13, 20)  # odd, prime, even: none needs to divide among the ranks


def _inputs(transformer) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from forward_profile import forward_inputs

    torch.manual_seed(0)
    cases = [forward_inputs(transformer, 4, length, torch.device("cpu"), torch.float32) for length in LENGTHS]
    batch = forward_inputs(transformer, 4, 11, torch.device("cpu"), torch.float32)  # two prompts, one padded
    batch.update(hidden_states=batch["hidden_states"].repeat(2, 1, 1), timestep=batch["timestep"].repeat(2),
                 encoder_hidden_states=torch.randn(2, 11, transformer.config.joint_attention_dim),
                 encoder_hidden_states_mask=torch.tensor([[1] * 11, [1] * 6 + [0] * 5]), img_shapes=batch["img_shapes"] * 2)  # fmt: skip
    return [*cases, batch]


def _rank(rank: int, world: int, store: str, path: str, compiled: bool, results: str) -> None:
    import torch.distributed as dist
    from diffusers import QwenImageTransformer2DModel
    from torch._dynamo.utils import counters

    import context_parallel
    import rope_attention

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    transformer = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer").float().eval()
    rope_attention.install(transformer)
    cases = _inputs(transformer)
    with torch.inference_mode():
        alone = [transformer(**case)[0] for case in cases]
        context_parallel.enable(transformer, context_parallel.Ranks(rank, world, dist.group.WORLD))
        if compiled:
            transformer.compile_repeated_blocks(fullgraph=True)
        split = [transformer(**case)[0] for case in cases]
    errors = [float((b - a).norm() / a.norm()) for a, b in zip(alone, split)]
    with open(f"{results}.{rank}", "w") as out:
        json.dump({"errors": errors, "breaks": sum(counters["graph_break"].values())}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_ranks_give_one_process_result_for_texts_of_any_length(tiny_settings, tmp_path, compiled):
    from tiny_model import ensure_tiny_model

    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), path, compiled, str(tmp_path / "result")), nprocs=2)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert max(result["errors"]) <= 1e-5, result  # float32
        assert result["breaks"] == 0  # no .item(), no graph break: the split sizes are the host's
