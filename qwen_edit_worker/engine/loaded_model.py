"""What the engine runs: the loaded pipeline and the facts about it the engine and the answers need.

`model_loader` builds one; the engine, the LoRA adapters and the GPU processes read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoadedModel:
    """The pipeline plus what the engine and the responses need to know about it."""

    pipe: object  # diffusers.QwenImageEditPlusPipeline
    device: torch.device
    dtype: torch.dtype
    precision: str
    lightning: bool
    offload: str
    compiled: bool = False
    # Adapters that belong to the model and stay active in every batch (an unfused Lightning).
    base_adapters: tuple[str, ...] = ()
    adapters: object = None  # the user LoRAs loaded into it (adapters.AdapterCache), once one is used
    lora_slots: tuple[str, ...] = ()  # hot-swappable adapter slots of a compiled transformer, once prepared
    lora_slot_count: int = 0  # how many it has, or will have once `adapters.ready_slots` has run
    lora_rank: int = 0
