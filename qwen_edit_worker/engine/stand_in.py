"""A one-block stand-in of the pipeline, to compile on while the real weights are still read.

Regional compilation gives the transformer's 60 identical blocks one compiled graph per
input shape, cached on the blocks' shared code and found again by any block whose inputs,
types and structure pass its guards. A transformer built from the model's own config with
`num_layers=1` (random weights, made on the GPU in a second) has such a block; a random VAE
of the model's config and its scheduler make the warm-up edits run as they will on the real
pipeline. `model_loader` prepares the stand-in as it prepares the real transformer (RoPE,
fp8, attention options, LoRA slots, the compile), runs the compile warm-ups on it while a
thread reads the weights, and the real blocks then find those graphs instead of compiling.
"""

from __future__ import annotations

import torch


def one_block_pipeline(path: str, device: torch.device, dtype: torch.dtype):
    """The pipeline of the model at `path` with a one-block transformer and a VAE, both random,
    and no text encoder: what `EditEngine.compile_ahead` needs."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    config = dict(QwenImageTransformer2DModel.load_config(path, subfolder="transformer"), num_layers=1)
    with torch.device(device):
        transformer = QwenImageTransformer2DModel.from_config(config).to(dtype).eval().requires_grad_(False)
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(path, subfolder="vae"))
    vae = vae.to(dtype).eval().requires_grad_(False)  # as loaded weights are: dynamo guards on it
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    pipe = QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
