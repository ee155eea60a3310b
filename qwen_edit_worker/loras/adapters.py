"""User LoRAs on the GPU: switched per batch, on the GPU thread only.

Two ways, chosen at load:

- **Slots, for a compiled transformer** (`prepare_slots`): diffusers' `enable_lora_hotswap`
  pads adapters to `MAX_LORA_RANK`; `MAX_LORAS` adapter slots are loaded with a blank (zero)
  LoRA over every linear layer of the transformer blocks (`ready_slots`: after the start-up
  warm-up, at the first idle moment or for the first batch with LoRAs; in context mode before
  compiling). A batch's k LoRAs
  are hot-swapped into the first k slots (`load_lora_weights(..., hotswap=True)` copies
  weights in place, the job's scale folded into the up-projection, padded on the GPU) and
  only those k slots are active, so a job pays for the LoRAs it brings, not for every slot;
  a batch without LoRAs disables them all. Each of those `MAX_LORAS + 1` states (`use_slots`)
  is compiled once, while the GPU is idle after the start-up warm-up (or by the first job
  that needs one); then nothing recompiles (measured on an
  H200: `BENCHMARKS.md`). Converted LoRAs are kept in CPU memory, the `MAX_LOADED_LORAS`
  most recently used.
- **Named adapters, eager** (quantized or offloaded models, CPU): each file is loaded once,
  as adapter `user_<sha256 prefix>`, and kept until `MAX_LOADED_LORAS` others were used more
  recently; a batch activates its adapters at their scales with `set_adapters`.

Either way a batch without user LoRAs computes the base model's output, bit for bit, and an
unfused Lightning adapter (quantized weights) stays active in every batch.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from qwen_edit_worker.loras.loading import load_weights
from qwen_edit_worker.loras.lora_files import LoraError, excerpt, read_lora
from qwen_edit_worker.loras.lora_store import LoraFile, lora_subject
from qwen_edit_worker.startup.startup_clock import timed

log = logging.getLogger("qwen_edit_worker.adapters")


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA of a request: its file, its scale, and where the job listed it."""

    file: LoraFile
    scale: float
    index: int
    setting: bool = False  # one of the endpoint's own (`LORAS`), not the job's `loras`

    @property
    def adapter(self) -> str:
        return f"user_{self.file.sha256[:16]}"

    @property
    def subject(self) -> str:
        return lora_subject(self.index, self.file.source, self.setting)


BLANK = ("blank", 0.0)
SLOT_PREFIX = "slot"

# One adapter change at a time in the whole process: peft creates adapter layers under
# accelerate's `init_empty_weights`, which patches `torch.nn.Module` for every thread, so a
# replica thread loading a LoRA while another did left the other's tensors on the `meta`
# device (one-colour images, no error).
ADAPTER_LOCK = threading.RLock()


def merged(loras: tuple[AppliedLora, ...]) -> tuple[AppliedLora, ...]:
    """One entry per file content, at the sum of its scales: the same file under two URLs is
    one adapter (named by its content), which would otherwise get only one of the scales."""
    by_content: dict[str, AppliedLora] = {}
    for lora in loras:
        first = by_content.get(lora.file.sha256)
        by_content[lora.file.sha256] = lora if first is None else replace(first, scale=first.scale + lora.scale)
    return tuple(by_content.values())


def ready_slots(model) -> None:
    """Prepare a compiled model's LoRA slots if it has none yet. `model_loader` leaves them
    until after the start-up warm-up (6-9 s of peft's Python on the real transformer, which the
    first result need not wait for): they are prepared at the first idle moment or for the
    first batch with LoRAs, whichever comes first. The blocks then compile once more, for the
    layers the slots wrap (the computation is the same, so inductor's cache has its kernels)."""
    with ADAPTER_LOCK:
        if model.lora_slot_count and not model.lora_slots:
            with timed(log, "preparing LoRA slots"):
                model.lora_slots = prepare_slots(model.pipe, model.lora_slot_count, model.lora_rank)


def prepare_slots(pipe, count: int, rank: int) -> tuple[str, ...]:
    """`count` hot-swappable adapter slots holding a blank LoRA, disabled. Before or after
    `compile_repeated_blocks`: it compiles each block lazily, on its next forward."""
    pipe.enable_lora_hotswap(target_rank=rank)
    names = tuple(f"{SLOT_PREFIX}{i}" for i in range(count))
    # At the full rank: diffusers pads only the first adapter loaded after enable_lora_hotswap,
    # and swapping a larger LoRA into an unpadded slot replaces its parameters (a recompilation).
    for name in names:  # each slot its own tensors: loading may keep them, and swaps copy into them
        pipe.load_lora_weights(blank_lora(pipe.transformer, rank), adapter_name=name)
    # Every slot active at scale 1: a job's scale (and its LoRA's alpha) is folded into the weights.
    pipe.set_adapters(list(names), adapter_weights=[1.0] * len(names))
    pipe.disable_lora()
    log.info("%d LoRA slots of rank %d prepared for hot-swapping", count, rank)
    return names


def blank_lora(transformer, rank: int = 1) -> dict[str, torch.Tensor]:
    """Zero low-rank weights for every linear layer of the transformer blocks (diffusers keys;
    hot-swapping pads them to the slots' rank), made where the layer is: a slot's blank at
    rank 64 is 850 MB, which the CPU would build and copy for nothing. Works before and after
    adapters are injected. With an up-projection bias (peft's `lora_bias`), so that a LoRA
    that has one applies in a slot as it does as a named adapter (one vector add a layer)."""
    state = {}
    for name, base in block_linears(transformer).items():
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        state[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, base.in_features, **like)
        state[f"transformer.{name}.lora_B.weight"] = torch.zeros(base.out_features, rank, **like)
        state[f"transformer.{name}.lora_B.bias"] = torch.zeros(base.out_features, **like)
    return state


def block_linears(transformer) -> dict[str, torch.nn.Linear]:
    """The transformer blocks' own linear layers by name, also once adapters wrap them (the
    name is then the wrapper's, the layer its `base_layer`)."""
    layers = {}
    for name, module in transformer.named_modules():
        if not name.startswith("transformer_blocks.") or _inside_adapter(name):
            continue
        base = getattr(module, "base_layer", module)
        if type(base) is torch.nn.Linear:
            layers[name] = base
    return layers


def _inside_adapter(name: str) -> bool:
    return any(part in ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
                        "lora_magnitude_vector") for part in name.split("."))  # fmt: skip


class AdapterCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self.loads = 0
        self._states: OrderedDict[str, dict] = OrderedDict()  # sha256 -> converted state dict (slots)
        self._slot_holds: dict[str, tuple[str, float]] = {}
        self._active_slots: tuple[str, ...] = ()  # what the transformer has active now
        self._blank: dict | None = None

    def apply(self, model, loras: tuple[AppliedLora, ...]) -> None:
        with ADAPTER_LOCK:
            self._apply(model, merged(loras))

    def _apply(self, model, loras: tuple[AppliedLora, ...]) -> None:
        if model.lora_slot_count:
            self._apply_slots(model, loras)
            return
        pipe = model.pipe  # not compiled: a compiled model has slots whenever it can take LoRAs
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

    # ------------------------------------------------------------------- slots (compiled)

    def _apply_slots(self, model, loras: tuple[AppliedLora, ...]) -> None:
        if loras:
            ready_slots(model)
        pipe = model.pipe
        for slot, lora in zip(model.lora_slots, loras):
            wanted = (lora.file.sha256, lora.scale)
            if self._slot_holds.get(slot, BLANK) == wanted:
                continue
            self._slot_holds[slot] = ("unknown", 0.0)  # until the swap has finished
            state = self._scaled_state(pipe, lora, model.lora_rank, model.device)
            pipe.load_lora_weights(state, adapter_name=slot, hotswap=True)
            self._slot_holds[slot] = wanted
        self.use_slots(model, len(loras))

    def use_slots(self, model, count: int) -> None:
        """Make the first `count` slots the active adapters (none: LoRAs disabled). The slots
        after them keep whatever they hold, inactive: they add nothing to the output."""
        active = model.lora_slots[:count]
        if active == self._active_slots:
            return
        pipe = model.pipe
        with ADAPTER_LOCK:
            if active:
                pipe.set_adapters(list(active), adapter_weights=[1.0] * len(active))
                if not self._active_slots:
                    pipe.enable_lora()
            else:
                pipe.disable_lora()
        self._active_slots = active

    def _blank_state(self, pipe) -> dict:
        """The transformer blocks' layers at rank 1, zero: the key and shape reference."""
        if self._blank is None:
            self._blank = blank_lora(pipe.transformer)
        return self._blank

    def _full(self, pipe, state: dict, rank: int, device: torch.device, scale: float = 1.0) -> dict:
        """Every layer of the slots at the slots' rank, on `device`: the LoRA's weights
        zero-padded (its up-projection times `scale`), zeros elsewhere. A swap then only copies
        in place: letting peft pad or zero layers itself replaces parameters, which recompiles.
        Padding where the slots live saves building and copying the padded zeros on the host."""
        full = {}
        for key, reference in self._blank_state(pipe).items():
            down = ".lora_A." in key
            shape = reference.shape if key.endswith(".bias") else (rank, reference.shape[1]) if down else (reference.shape[0], rank)
            padded = torch.zeros(shape, dtype=reference.dtype, device=device)
            value = state.get(key)
            if value is not None:
                value = value.to(device, non_blocking=True)
                if down:
                    padded[: value.shape[0]] = value
                else:
                    padded[..., : value.shape[-1]] = value * scale
            full[key] = padded
        return full

    def _scaled_state(self, pipe, lora: AppliedLora, rank: int, device: torch.device) -> dict:
        """The LoRA in diffusers' keys, checked against the slots, padded, up-projection times the scale."""
        state = self._states.get(lora.file.sha256)
        if state is None:
            state = self._converted(pipe, lora, rank)
            self._states[lora.file.sha256] = state
            self.loads += 1
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)
        self._states.move_to_end(lora.file.sha256)
        return self._full(pipe, state, rank, device, lora.scale)

    def _converted(self, pipe, lora: AppliedLora, rank: int) -> dict:
        """The file in diffusers' keys (`lora_files`), each layer's scaling folded into its
        up-projection, checked against the slots."""
        subject = lora.subject
        state = read_lora(lora.file.path, subject, values=False).folded()  # its values were checked when it was fetched
        blank = self._blank_state(pipe)
        outside = [key for key in state if key not in blank]
        if outside:
            reason = "matches none of the transformer's layers: it is not a Qwen-Image LoRA"
            if len(outside) < len(state):
                reason = f"targets layers outside the transformer blocks ({excerpt(outside[0].split('.lora_')[0])})"
            raise LoraError(f"{subject} {reason}.")
        for key, value in state.items():
            down = ".lora_A." in key
            if down and value.shape[0] > rank:
                raise LoraError(f"{subject} has rank {value.shape[0]}, above MAX_LORA_RANK ({rank}).")
            if value.shape[1 if down else 0] != blank[key].shape[1 if down else 0]:
                raise LoraError(f"{subject} does not fit this model: its layer shapes differ from the transformer's.")
        dtype = next(iter(blank.values())).dtype
        return {key: value.to(dtype) for key, value in state.items()}

    # ------------------------------------------------------------------- named adapters (eager)

    def _load(self, pipe, lora: AppliedLora) -> None:
        name = lora.adapter
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        subject = lora.subject
        weights = read_lora(lora.file.path, subject, values=False)  # its values were checked when it was fetched
        try:
            load_weights(pipe, weights, name, subject)
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
