"""What a LoRA file holds, read once and checked before the GPU thread sees it.

Both ways of applying a LoRA (`adapters`: slots for a compiled transformer, named adapters
otherwise) take their weights from `read_lora`, so they accept the same files and apply
them at the same strength:

- the file's header is bounded before it is parsed (its size, the number of tensors, the
  length of a key, the metadata's size and depth): a file of a million empty tensors is
  refused in milliseconds, on the download thread;
- text-encoder weights (kohya `lora_te*_`, diffusers `text_encoder.`) are left out, and the
  job is told in `warnings`: this worker applies LoRAs to the transformer only;
- diffusers converts the rest to its own keys (kohya, ComfyUI, lightx2v, DiffSynth layouts;
  a kohya `alpha` is folded into the weights there);
- a PEFT file's own scaling, which diffusers' `save_lora_weights` keeps in the metadata
  (`transformer.r`, `transformer.lora_alpha`, `rank_pattern`, `alpha_pattern`,
  `use_rslora`), is worked out per layer as peft does (`scalings`);
- DoRA files (`dora_scale`, `lora_magnitude_vector`, `use_dora`) and weights of other
  adapter kinds are refused: applied as plain LoRAs they would give other pixels, silently;
- every weight must be finite in bfloat16 once scaled, and so must the largest change it
  can make to a layer: a NaN or an overflow would otherwise come back as a one-colour image.

Sentences name the job's entry and quote nothing of the file but a short, escaped excerpt.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_edit_worker.errors import InputError

# Real files: a rank-128 LoRA over every layer of the 60 blocks has about 5,000 tensors, a
# header of about 500 KB and keys of about 80 characters.
MAX_HEADER_BYTES = 8 * 1024**2
MAX_TENSORS = 50_000
MAX_KEY_CHARS = 512
MAX_METADATA_CHARS = 256 * 1024
MAX_METADATA_DEPTH = 8

# Key prefixes of LoRAs made for the text encoder (kohya, diffusers).
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder.", "te.", "te1.", "te2.")
DORA_MARKS = ("dora_scale", "lora_magnitude_vector")
# What a converted transformer LoRA may hold, per layer.
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' `LORA_ADAPTER_METADATA_KEY`
PREFIX = "transformer."
BF16_MAX = torch.finfo(torch.bfloat16).max


class LoraError(InputError):
    """A LoRA file cannot be used; the message says why in one sentence."""


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA in diffusers' keys (`transformer.<layer>.lora_A.weight`, ...), the metadata
    diffusers reads with it (None: none), and each layer's scaling (alpha / r, as the
    metadata says; 1 where it says nothing)."""

    state: dict[str, torch.Tensor]
    metadata: dict | None
    scalings: dict[str, float]
    skipped_text_encoder: bool

    def folded(self) -> dict[str, torch.Tensor]:
        """The state with each layer's scaling multiplied into its up-projection (and bias)."""
        return {key: value * self.scalings[layer_of(key)] if ".lora_B." in key else value
                for key, value in self.state.items()}  # fmt: skip


def excerpt(text: str, limit: int = 60) -> str:
    """A piece of text from a file, safe to put in a sentence or a log line: escaped, short."""
    shown = text if len(text) <= limit else text[: limit - 3] + "..."
    return shown.encode("unicode_escape").decode("ascii")  # a newline shows as \\n, a control character as \\x1b


def layer_of(key: str) -> str:
    """`transformer_blocks.0.attn.to_q` for `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`."""
    return key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]


def header_keys(path: Path, subject: str) -> tuple[list[str], dict[str, str]]:
    """The tensor names and the metadata of a safetensors file, within the bounds above."""
    from safetensors import safe_open

    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))  # the format's first 8 bytes: the header's size
    except (OSError, struct.error):
        raise LoraError(f"{subject} is not a safetensors file.") from None
    if length > path.stat().st_size - 8:
        raise LoraError(f"{subject} is not a safetensors file.")
    if length > MAX_HEADER_BYTES:
        raise LoraError(f"{subject} has a header of {length} bytes; a LoRA's is far below {MAX_HEADER_BYTES}.")
    try:
        with safe_open(str(path), framework="pt") as tensors:
            keys, metadata = list(tensors.keys()), tensors.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors' errors: not a safetensors file
        raise LoraError(f"{subject} is not a safetensors file.") from None
    if not keys:
        raise LoraError(f"{subject} holds no tensors.")
    if len(keys) > MAX_TENSORS:
        raise LoraError(f"{subject} holds {len(keys)} tensors; a LoRA holds at most {MAX_TENSORS}.")
    long = next((key for key in keys if len(key) > MAX_KEY_CHARS), None)
    if long is not None:
        raise LoraError(f"{subject} has a tensor name of {len(long)} characters; at most {MAX_KEY_CHARS} are allowed.")
    if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_CHARS:
        raise LoraError(f"{subject} has more than {MAX_METADATA_CHARS} characters of metadata.")
    return keys, metadata


def check_file(path: Path, subject: str) -> bool:
    """Refuse in a sentence a file that is not a usable transformer LoRA; read every tensor
    (the download thread's work, once per file). Whether it also held text-encoder weights."""
    return read_lora(path, subject).skipped_text_encoder


def holds_text_encoder_weights(path: Path, subject: str) -> bool:
    """Whether a (checked) file also holds text-encoder weights: its header alone says."""
    keys, _ = header_keys(path, subject)
    return any(key.startswith(TEXT_ENCODER_PREFIXES) for key in keys)


def read_lora(path: Path, subject: str, values: bool = True) -> LoraWeights:
    """The file's transformer LoRA in diffusers' keys, checked as the module docstring says.
    `values=False` skips the pass over every weight (the GPU thread reads files whose
    values the download thread has checked)."""
    from safetensors import safe_open

    keys, file_metadata = header_keys(path, subject)
    if any(mark in key for key in keys for mark in DORA_MARKS):
        raise LoraError(f"{subject} is a DoRA file (it holds magnitude vectors); this worker applies plain LoRAs only.")
    kept = [key for key in keys if not key.startswith(TEXT_ENCODER_PREFIXES)]
    if not kept:
        raise LoraError(f"{subject} is a text-encoder LoRA; this worker applies LoRAs to the transformer only.")
    metadata = _adapter_metadata(file_metadata, subject)
    try:
        with safe_open(str(path), framework="pt") as tensors:
            raw = {key: tensors.get_tensor(key) for key in kept}
    except Exception:  # noqa: BLE001 - safetensors' errors: a damaged file
        raise LoraError(f"{subject} is not a readable safetensors file.") from None
    for key, value in raw.items():
        if not (value.is_floating_point() or value.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise LoraError(f"{subject} holds a tensor of type {str(value.dtype).removeprefix('torch.')} ({excerpt(key)}); LoRA weights are numbers.")
    state = _converted(raw, subject)
    scalings = _scalings(state, metadata, subject)
    weights = LoraWeights(state, metadata, scalings, skipped_text_encoder=len(kept) < len(keys))
    if values:
        _check_finite(weights, subject)
    return weights


def _converted(raw: dict[str, torch.Tensor], subject: str) -> dict[str, torch.Tensor]:
    """diffusers' conversion to its keys; then only LoRA weights may remain."""
    from diffusers import QwenImageEditPlusPipeline

    try:
        state = QwenImageEditPlusPipeline.lora_state_dict(raw)
    except Exception:  # noqa: BLE001 - diffusers' conversion raises many kinds, quoting the keys
        raise LoraError(f"{subject} matches none of the transformer's layers: it is not a Qwen-Image LoRA.") from None
    other = next((key for key in state if not key.endswith(LORA_SUFFIXES)), None)
    if other is not None:
        raise LoraError(f"{subject} holds weights that are not LoRA up/down projections ({excerpt(other)}); "
                        "LoKr, LoHa and full-weight differences are not applied.")  # fmt: skip
    for key in state:
        if key.endswith(".lora_A.weight") and key.replace(".lora_A.", ".lora_B.") not in state:
            raise LoraError(f"{subject} has a down-projection without its up-projection ({excerpt(layer_of(key))}).")
        if key.endswith(".lora_B.weight") and key.replace(".lora_B.", ".lora_A.") not in state:
            raise LoraError(f"{subject} has an up-projection without its down-projection ({excerpt(layer_of(key))}).")
    return state


def _adapter_metadata(file_metadata: dict[str, str], subject: str) -> dict | None:
    """diffusers' adapter metadata (`save_lora_weights(..., transformer_lora_adapter_metadata=...)`),
    as diffusers reads it: the LoraConfig's fields under a `transformer.` prefix."""
    text = file_metadata.get(METADATA_KEY)
    if not text:
        return None
    bad = f"{subject} has unusable '{METADATA_KEY}' metadata"
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError):
        raise LoraError(f"{bad}: it is not JSON.") from None
    if not isinstance(metadata, dict) or _depth(metadata) > MAX_METADATA_DEPTH:
        raise LoraError(f"{bad}: it must be one JSON object of LoRA settings.")
    # diffusers reads only the transformer's part (it filters by the prefix): so do both paths here
    return {key: value for key, value in metadata.items() if key.startswith(PREFIX)} or None


def _depth(value, level: int = 0) -> int:
    if level > MAX_METADATA_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, level + 1) for child in children), default=level)


def _scalings(state: dict[str, torch.Tensor], metadata: dict | None, subject: str) -> dict[str, float]:
    """Each layer's alpha / r (alpha / sqrt(r) with rsLoRA): peft's LoraConfig built from the
    metadata as diffusers builds it, and peft's own pattern matching."""
    layers = {layer_of(key) for key in state}
    if metadata is None:
        return dict.fromkeys(layers, 1.0)
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    bad = f"{subject} has unusable '{METADATA_KEY}' metadata"
    try:
        config = LoraConfig(**{key.removeprefix(PREFIX): value for key, value in metadata.items()})
    except Exception:  # noqa: BLE001 - peft's validation raises many kinds, quoting the values
        raise LoraError(f"{bad}: peft's LoraConfig does not take it.") from None
    if not (isinstance(config.rank_pattern, dict) and isinstance(config.alpha_pattern, dict)):
        raise LoraError(f"{bad}: rank_pattern and alpha_pattern must be objects.")
    if config.use_dora:
        raise LoraError(f"{subject} is a DoRA file (its metadata says use_dora); this worker applies plain LoRAs only.")
    scalings = {}
    for layer in layers:
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), layer), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), layer), config.lora_alpha)
        if not (_number(rank) and rank > 0 and _number(alpha)):
            raise LoraError(f"{bad}: r must be a positive number and lora_alpha a finite number.")
        try:
            scalings[layer] = float(alpha) / (math.sqrt(rank) if config.use_rslora else float(rank))
        except OverflowError:
            scalings[layer] = math.inf
        if not abs(scalings[layer]) <= BF16_MAX:
            raise LoraError(f"{bad}: its lora_alpha over r overflows bfloat16.")
    return scalings


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_finite(weights: LoraWeights, subject: str) -> None:
    """Every weight finite in bfloat16 once scaled, and so the largest change to a layer
    (rank x max|B| x max|A|, an upper bound of every entry of B @ A)."""
    largest: dict[str, list[float]] = {}
    for key, value in weights.state.items():
        scaled = value.float() * weights.scalings[layer_of(key)] if ".lora_B." in key else value.float()
        top = float(scaled.abs().max()) if scaled.numel() else 0.0
        if not math.isfinite(top) or top > BF16_MAX:
            raise LoraError(f"{subject} holds weights that are not finite numbers in bfloat16 (NaN, infinity or "
                            f"overflow in {excerpt(layer_of(key))}).")  # fmt: skip
        if key.endswith(".weight"):
            largest.setdefault(layer_of(key), []).append(top * (value.shape[0] if ".lora_A." in key else 1))
    for layer, tops in largest.items():
        if math.prod(tops) > BF16_MAX:
            raise LoraError(f"{subject} changes layer {excerpt(layer)} by more than bfloat16 can hold.")
