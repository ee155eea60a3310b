"""Run the 4-bit, 8-bit and fp8 loading paths on a GPU with the tiny model saved to disk.

diffusers' bitsandbytes quantizer refuses to run without CUDA, so CI cannot cover these
paths; this script is how they are checked on the GPU machine:

    python benchmarks/check_quantized_loading.py /tmp/models

For each mode it loads the tiny model through `model_loader.load_model` (the production
path: save, `from_pretrained` with a `PipelineQuantizationConfig`, Lightning, placement),
runs one two-image edit through the engine, and prints what it found. It also runs the
8-bit retry with fp32 CPU offload under a GPU budget too small for the transformer.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from PIL import Image

import model_loader
from config import Settings
from qwen_edit_worker.engine.edit_engine import EditEngine, EditRequest


def linear_kinds(module: torch.nn.Module) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            kinds[type(sub).__name__] = kinds.get(type(sub).__name__, 0) + 1
    return kinds


def edit_once(settings: Settings, model) -> np.ndarray:
    engine = EditEngine(settings, lambda: model)
    images = tuple(Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)) for i in range(2))
    edit = EditRequest(prompt="make it blue", images=images, seed=1, num_inference_steps=2, true_cfg_scale=4.0, width=64, height=64)
    return engine.run_batch([edit])[0].images[0]


def check(mode: str, model_dir: str, lightning: bool, compile_: bool = False) -> None:
    env = {"MODEL_ID": "tiny-random", "MODEL_DIR": model_dir, "PRECISION_MODE": mode, "USE_LIGHTNING_LORA": str(lightning),
           "COMPILE_TRANSFORMER": str(compile_)}  # fmt: skip
    settings = Settings.from_env(env)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = model_loader.load_model(settings)
    pixels = edit_once(settings, model)
    print(
        f"[{mode} lightning={lightning} compile={compile_}] precision={model.precision} dtype={model.dtype} "
        f"offload={model.offload} compiled={model.compiled} weight={type(model.pipe.transformer.transformer_blocks[1].attn.to_q.weight).__name__} "
        f"transformer linears={linear_kinds(model.pipe.transformer)} text_encoder linears={linear_kinds(model.pipe.text_encoder)} "
        f"img_mod kept={type(model.pipe.transformer.transformer_blocks[0].img_mod[1]).__name__} "
        f"adapters={model.pipe.get_list_adapters()} output={pixels.shape} finite={bool(np.isfinite(pixels).all())} "
        f"peak_gpu={torch.cuda.max_memory_allocated() / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s"
    )


def check_8bit_offload_retry(model_dir: str) -> None:
    settings = Settings.from_env({"MODEL_ID": "tiny-random", "MODEL_DIR": model_dir, "PRECISION_MODE": "8bit"})
    path = model_loader.resolve_model_path(settings)
    pipe = model_loader._load_8bit_with_cpu_offload(settings, path, torch.bfloat16, gpu_budget=20_000)
    placement = sorted({str(d) for d in getattr(pipe.transformer, "hf_device_map", {}).values()})
    print(f"[8bit retry] transformer device map spans {placement}; linears={linear_kinds(pipe.transformer)}")


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else "/tmp/models"
    print(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}")
    for mode, lightning, compile_ in [("bf16", True, False), ("4bit", False, False), ("4bit", True, False),
                                      ("8bit", False, False), ("8bit", True, False), ("fp8", False, False),
                                      ("fp8", True, True), ("bf16", False, True)]:  # fmt: skip
        check(mode, directory, lightning, compile_)
    check_8bit_offload_retry(directory)
