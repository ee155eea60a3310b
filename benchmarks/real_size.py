"""The one real-size builder every GPU benchmark uses: Qwen-Image-Edit-2509's real shapes with
random weights (timing does not depend on the weights' values), plus the benchmarks' inputs.

Transformer 20.4B, a Qwen2.5-VL-7B-shaped text encoder and the VAE, made on the device in
bf16; the tokenizer is the tiny model's (a system prompt of about 150 tokens instead of 64;
images dominate the sequence).
"""

from __future__ import annotations

import base64
import io
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_loader import LIGHTNING_SCHEDULER_CONFIG  # noqa: E402
from qwen_edit_worker.testing.tiny_model import TINY_TRANSFORMER  # noqa: E402

PROMPTS = [
    "Make the sky a deep orange sunset and add birds",
    "Turn the photo into a watercolor painting",
    "Replace the background with a snowy mountain landscape at dawn, keep the person unchanged",
    "Add a red hat",
    "Make it night time with city lights in the distance and a full moon",
    "Change the jacket to blue denim",
    "Remove the text from the sign",
    "Give the scene a cinematic teal and orange color grade, increase contrast slightly",
]


def text_encoder_7b(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                     "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [7, 15, 23, 31]},
        vocab_size=152064, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)


@contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside are created on `device` in `dtype` (random weights, no copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_transformer(device: torch.device, dtype: torch.dtype, tiny: bool = False):
    """The real-size transformer (or the tiny one) with seed 0's random weights, made on `device`."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    with built_on(device, dtype):
        return (QwenImageTransformer2DModel(**TINY_TRANSFORMER) if tiny else QwenImageTransformer2DModel()).eval()


def build_pipeline(device: torch.device = torch.device("cuda")):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from qwen_edit_worker.testing.tiny_model import _build_tokenizer

    tokenizer = _build_tokenizer()
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())  # fmt: skip
    start = time.perf_counter()
    torch.manual_seed(0)
    with built_on(device, torch.bfloat16):
        transformer = QwenImageTransformer2DModel()  # the defaults are Qwen-Image's real configuration
        vae = AutoencoderKLQwenImage()
        text_encoder = text_encoder_7b(tokenizer)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, processor=processor, transformer=transformer.eval(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    params = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e9 for n in ("transformer", "text_encoder", "vae")}
    print(f"built real-size pipeline in {time.perf_counter() - start:.0f} s: {params} B params", flush=True)
    return pipe


def input_png(side: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
