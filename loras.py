"""Loading LoRA files into the transformer through diffusers, and checking what they reached.

diffusers' `load_lora_weights` accepts a file whose keys match no module of the
transformer (a LoRA for another model, or one keyed for the text encoder): it warns and
loads nothing, and the worker would then serve the base model under the LoRA's name. So
every load counts the layers the adapter reached and refuses a LoRA that reached none.
"""

from __future__ import annotations

import logging
from pathlib import Path

from schema import InputError

log = logging.getLogger("qwen_edit_worker.loras")


class LoraError(InputError):
    """A LoRA file cannot be used; the message says why in one sentence."""


def adapter_layers(transformer, adapter_name: str) -> int:
    """How many of the transformer's layers carry `adapter_name` (peft's LoRA layers)."""
    return sum(1 for module in transformer.modules() if adapter_name in getattr(module, "lora_A", {}))


def load_lora(pipe, path: str | Path, adapter_name: str) -> int:
    """Load a LoRA file as `adapter_name`; the number of transformer layers it reached."""
    path = Path(path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    reached = adapter_layers(pipe.transformer, adapter_name)
    if reached == 0:
        pipe.delete_adapters(adapter_name)
        raise LoraError(
            f"The LoRA {path.name} reached none of the transformer's layers: its keys are not those of a "
            "Qwen-Image transformer LoRA."
        )
    log.info("LoRA %s (%s) reached %d transformer layers", path.name, adapter_name, reached)
    return reached
