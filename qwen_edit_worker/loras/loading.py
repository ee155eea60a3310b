"""Loading LoRA weights into the transformer through diffusers, and checking what they reached.

diffusers' `load_lora_weights` accepts a file whose keys match no module of the
transformer (a LoRA for another model, or one keyed for the text encoder): it warns and
loads nothing, and the worker would then serve the base model under the LoRA's name. So
every load counts the layers the adapter reached and refuses a LoRA that reached none.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qwen_edit_worker.loras.lora_files import LoraError, LoraWeights

log = logging.getLogger("qwen_edit_worker.loras")

__all__ = ["LoraError", "adapter_layers", "load_lora", "load_weights"]


def adapter_layers(transformer, adapter_name: str) -> int:
    """How many of the transformer's layers carry `adapter_name` (peft's LoRA layers)."""
    return sum(1 for module in transformer.modules() if adapter_name in getattr(module, "lora_A", {}))


def load_lora(pipe, path: str | Path, adapter_name: str) -> int:
    """Load a LoRA file the worker ships or is configured with (Lightning) as `adapter_name`;
    the number of transformer layers it reached."""
    path = Path(path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    return _reached(pipe, adapter_name, f"The LoRA {path.name}")


def load_weights(pipe, weights: LoraWeights, adapter_name: str, label: str) -> int:
    """Load a user's checked LoRA (`lora_files.read_lora`) as `adapter_name`, as
    `load_lora_weights` does once it has read a file: its metadata too (the scaling a PEFT
    file keeps there). The number of transformer layers it reached."""
    pipe.load_lora_into_transformer(weights.state, transformer=pipe.transformer, adapter_name=adapter_name,
                                    metadata=weights.metadata, _pipeline=pipe, low_cpu_mem_usage=True)  # fmt: skip
    return _reached(pipe, adapter_name, label)


def _reached(pipe, adapter_name: str, label: str) -> int:
    reached = adapter_layers(pipe.transformer, adapter_name)
    if reached == 0:
        pipe.delete_adapters(adapter_name)
        raise LoraError(
            f"{label} reached none of the transformer's layers: its keys are not those of a Qwen-Image transformer LoRA."
        )
    log.info("LoRA %s reached %d transformer layers", adapter_name, reached)
    return reached
