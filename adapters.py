"""User LoRAs on the GPU: loaded as diffusers adapters by content, switched per batch.

Runs on the GPU thread only (loading changes the transformer's modules). Each file is
loaded once, as adapter `user_<sha256 prefix>`, and kept until `MAX_LOADED_LORAS` others were
used more recently (then removed with `delete_adapters`). A batch activates exactly its
requests' adapters at their scales with `set_adapters`; a batch without user LoRAs disables
them, so its output is the base model's, bit for bit. The Lightning adapter, where it stays
unfused (quantized weights), is kept active in every batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import compilation
from lora_store import LoraFile
from loras import LoraError, load_lora

log = logging.getLogger("qwen_edit_worker.adapters")


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA of a request: its file, its scale, and where the job listed it."""

    file: LoraFile
    scale: float
    index: int

    @property
    def adapter(self) -> str:
        return f"user_{self.file.sha256[:16]}"


class AdapterCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self.loads = 0

    def apply(self, model, loras: tuple[AppliedLora, ...]) -> None:
        pipe = model.pipe
        if loras and model.compiled:
            # Swapping adapters under the compiled blocks would recompile them for every set.
            compilation.uncompile(pipe)
            model.compiled = False
            log.warning("per-request LoRAs: the transformer runs eagerly from now on (compiled blocks cannot swap adapters)")
        for lora in loras:
            self._load(pipe, lora)
        names = list(model.base_adapters) + [lora.adapter for lora in loras]
        weights = [1.0] * len(model.base_adapters) + [lora.scale for lora in loras]
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=weights)
        elif self._loaded:
            pipe.disable_lora()
        self._evict(pipe, keep=set(names))

    def _load(self, pipe, lora: AppliedLora) -> None:
        name = lora.adapter
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        subject = f"Input field 'loras[{lora.index}].path' ({lora.file.source})"
        try:
            load_lora(pipe, lora.file.path, name)
        except Exception as error:  # noqa: BLE001 - peft and diffusers raise many kinds
            _forget(pipe, name)
            raise LoraError(f"{subject} {_why_not(error)}.") from None
        self._loaded[name] = None
        self.loads += 1

    def _evict(self, pipe, keep: set[str]) -> None:
        for name in list(self._loaded):
            if len(self._loaded) <= self.capacity:
                break
            if name not in keep:
                pipe.delete_adapters(name)
                del self._loaded[name]
                log.info("LoRA adapter %s removed (MAX_LOADED_LORAS=%d)", name, self.capacity)


NOTHING_MATCHED = ("not found in the base model", "should be empty at this point", "Invalid LoRA checkpoint")


def _why_not(error: BaseException) -> str:
    """Why diffusers or peft could not load a LoRA, in words."""
    text = str(error)
    if isinstance(error, LoraError) or any(sign in text for sign in NOTHING_MATCHED):
        return "matches none of the transformer's layers: it is not a Qwen-Image LoRA"
    if "size mismatch" in text:
        return "does not fit this model: its layer shapes differ from the transformer's"
    return "could not be loaded into the transformer"


def _forget(pipe, name: str) -> None:
    try:
        pipe.delete_adapters(name)
    except Exception:  # noqa: BLE001 - it may never have been registered
        pass
