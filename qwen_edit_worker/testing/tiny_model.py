"""A tiny, randomly initialised Qwen-Image-Edit pipeline built from the real classes.

`MODEL_ID=tiny-random` uses it for tests, CI and the offline demo. It is saved to disk
and loaded back by `model_loader` through the same `from_pretrained` path as the real
model, so everything downstream of loading is the production code. Nothing here
touches the network: the tokenizer is trained locally with Qwen's special tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

# Bump when the tiny architecture changes, so cached copies are rebuilt.
TINY_VERSION = "2"
TINY_LORA_RANK = 8
# alpha / rank = 1/8 as in the real Lightning files (rank 64, alpha 8): a loader that ignored
# alpha would fuse 8 times too much, which a test of the fused weights sees.
TINY_LORA_ALPHA = 1.0
# Latent statistics far from mean 0 / std 1 (the real VAE's are per channel too), so that a
# de-normalisation error changes the decoded images.
TINY_LATENTS_MEAN = [0.3, -0.5, 0.1, 0.8]
TINY_LATENTS_STD = [0.6, 1.9, 0.4, 1.3]

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

_TRAINING_TEXT = [
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image.",
    "Generate a new image that meets the user's requirements while maintaining consistency with the "
    "original input where appropriate.",
    "system user assistant Picture 1: 2: 3: make the sky blue, add a hat, turn it into a watercolor painting.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def ensure_tiny_model(directory: str | os.PathLike) -> Path:
    """Build the tiny pipeline (and a tiny Lightning-format LoRA) into `directory` once."""
    root = Path(directory) / f"tiny-random-v{TINY_VERSION}"
    marker = root / ".complete"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    pipeline = build_tiny_pipeline()
    pipeline.save_pretrained(root / "pipeline", safe_serialization=True)
    save_file(lightning_format_lora(pipeline.transformer), root / "lightning-lora.safetensors")
    marker.touch()
    return root


# The tiny transformer: Qwen-Image's architecture at 2 blocks of 2 heads of 16 channels.
TINY_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))  # fmt: skip


def build_tiny_pipeline():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _build_tokenizer()
    processor = _build_processor(tokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 2,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=TINY_LATENTS_MEAN,
        latents_std=TINY_LATENTS_STD,
    )
    text_config = {
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "vocab_size": len(tokenizer),
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    return QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )


def lightning_format_lora(
    transformer: torch.nn.Module, rank: int = TINY_LORA_RANK, alpha: float = TINY_LORA_ALPHA, seed: int = 1,
    std: float = 0.05,
) -> dict[str, torch.Tensor]:
    """A random LoRA keyed as lightx2v's Lightning files are (lora_down/lora_up/alpha), over
    the transformer blocks' attention and MLP linears (720 at real size). The defaults make
    the tiny model's Lightning file; the GPU benchmarks make real-size ones with it."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if not name.startswith("transformer_blocks.") or not isinstance(module, torch.nn.Linear):
            continue
        if ".attn." not in name and ".img_mlp." not in name and ".txt_mlp." not in name:
            continue
        down = torch.randn(rank, module.in_features, generator=generator) * std
        up = torch.randn(module.out_features, rank, generator=generator) * std
        state[f"{name}.lora_down.weight"] = down.to(torch.bfloat16)
        state[f"{name}.lora_up.weight"] = up.to(torch.bfloat16)
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    return state


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]
    )
    bpe.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    return tokenizer


def _build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    # Small pixel bounds keep the vision tower cheap on CPU; the real processor allows far more.
    pixel_bounds = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    image_processor = Qwen2VLImageProcessor(size=pixel_bounds)
    video_processor = Qwen2VLVideoProcessor(size=pixel_bounds)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
