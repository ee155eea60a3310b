"""The job input contract: `job["input"]` parsed into an `EditInput`, or one clear sentence.

Types are strict (a JSON number where a number is expected, not a string) and unknown
fields are refused, because they are usually typos (`promt`) that would otherwise be
silently ignored. Every error names the field and what it allows.
"""

from __future__ import annotations

import difflib
import random
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from config import Settings
from qwen_edit_worker.errors import InputError

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**32 - 1
# Qwen's control tokens (<|image_pad|>, <|vision_start|>, <|im_end|>, ...): the tokenizer would
# read them as the template's markers, not as text, and break the image-token count.
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
ImageSource = Annotated[str, Field(min_length=1)]

# What each field allows, in the words of the error sentence.
FIELD_RULES: dict[str, str] = {
    "prompt": f"a non-empty string of at most {MAX_PROMPT_CHARS} characters",
    "negative_prompt": f"a string of at most {MAX_PROMPT_CHARS} characters",
    "image_url": "an http(s) URL string",
    "image_base64": "a base64 string or data URI",
    "images": "a list of image URLs, base64 strings or data URIs",
    "num_inference_steps": "a whole number from 1 to 100",
    "true_cfg_scale": "a number from 0 to 20 (above 1 turns classifier-free guidance on)",
    "seed": f"a whole number from 0 to {MAX_SEED}",
    "width": "a whole number from 64 to 2048",
    "height": "a whole number from 64 to 2048",
    "num_images": "a whole number from 1 to 4",
    "output_format": "one of png, jpeg (or jpg), webp",
    "output_quality": "a whole number from 1 to 100",
    "loras": "a list of objects {\"path\", \"weight_name\", \"scale\"}",
}


# Field names other APIs use for ours: an unknown field's error suggests ours.
FIELD_ALIASES: dict[str, str] = {
    "image": "images", "image_urls": "images", "input_images": "images", "init_image": "image_url",
    "image_b64": "image_base64", "steps": "num_inference_steps", "guidance_scale": "true_cfg_scale",
    "cfg_scale": "true_cfg_scale", "num_outputs": "num_images", "format": "output_format", "quality": "output_quality",
}  # fmt: skip

# What one item of a list field allows.
ITEM_RULES: dict[str, str] = {
    "images": "an image URL, a base64 string or a data URI",
    "loras": "an object {\"path\", \"weight_name\", \"scale\"}",
}


# A Hugging Face repo id (owner/name) or an http(s) URL of a .safetensors file.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
LORA_RULES: dict[str, str] = {
    "path": "an http(s) URL of a .safetensors file or a Hugging Face repo id (owner/name)",
    "weight_name": "the name of a .safetensors file inside the repo",
    "scale": "a number from -4 to 4",
}


class LoraInput(BaseModel):
    """One LoRA a job applies on top of the model."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    path: Annotated[str, Field(min_length=1, max_length=2048)]
    weight_name: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    scale: Annotated[float, Field(ge=-4.0, le=4.0, allow_inf_nan=False)] = 1.0

    @field_validator("path")
    @classmethod
    def _url_or_repo(cls, value: str) -> str:
        if _is_url(value):
            if not value.split("?", 1)[0].lower().endswith(".safetensors"):
                raise ValueError("not a .safetensors URL")
        elif not REPO_ID.fullmatch(value):
            raise ValueError("neither a URL nor a repo id")
        return value

    @field_validator("weight_name")
    @classmethod
    def _file_in_repo(cls, value: str | None) -> str | None:
        if value is not None and (not value.endswith(".safetensors") or value.startswith("/") or ".." in value.split("/")):
            raise ValueError("not a safetensors file name")
        return value

    @property
    def is_url(self) -> bool:
        return _is_url(self.path)


def _is_url(path: str) -> bool:
    return path[:8].lower().startswith(("http://", "https://"))


class EditInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Prompt
    image_url: ImageSource | None = None
    image_base64: ImageSource | None = None
    images: list[ImageSource] | None = None
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    num_inference_steps: Annotated[int, Field(ge=1, le=100)] | None = None
    true_cfg_scale: Annotated[float, Field(ge=0.0, le=20.0, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    width: Annotated[int, Field(ge=64, le=2048)] | None = None
    height: Annotated[int, Field(ge=64, le=2048)] | None = None
    num_images: Annotated[int, Field(ge=1, le=4)] = 1
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: Annotated[int, Field(ge=1, le=100)] = 95
    loras: list[LoraInput] | None = None

    @field_validator("output_format", mode="before")
    @classmethod
    def _format_aliases(cls, value: Any) -> Any:
        # "jpg" is what file names say; any case is accepted.
        if isinstance(value, str):
            value = value.lower()
            return "jpeg" if value == "jpg" else value
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _plain_text(cls, value: str | None) -> str | None:
        match = CONTROL_TOKEN.search(value or "")
        if match:
            raise ValueError(f"control token {match.group(0)}")
        return value

    def image_sources(self) -> list[str]:
        """Every input image in order: image_url, image_base64, then images."""
        single = [s for s in (self.image_url, self.image_base64) if s is not None]
        return single + list(self.images or [])


def parse(job_input: Any, settings: Settings) -> EditInput:
    if not isinstance(job_input, dict):
        raise InputError("'input' must be a JSON object with a 'prompt' and at least one image.")
    try:
        params = EditInput.model_validate(job_input)
    except ValidationError as error:
        problems = error.errors()
        # An unknown field is usually a typo of a missing one: name the typo first.
        first = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
        raise InputError(_sentence(first)) from None
    loras = params.loras or []
    if loras and settings.max_loras == 0:
        raise InputError("Input field 'loras' is not taken by this endpoint (MAX_LORAS=0); send no loras.")
    if len(loras) > settings.max_loras:
        raise InputError(f"Input field 'loras' holds {len(loras)} LoRAs; this endpoint allows at most {settings.max_loras} (MAX_LORAS).")
    for i, lora in enumerate(loras):
        if lora.is_url and lora.weight_name is not None:
            raise InputError(f"Input field 'loras[{i}].weight_name' picks a file in a Hugging Face repo; a URL names its "
                             "file itself: send weight_name only with a repo id.")  # fmt: skip
        for j in range(i):
            if (lora.path, lora.weight_name) == (loras[j].path, loras[j].weight_name):
                raise InputError(f"Input field 'loras[{i}].path' repeats loras[{j}]; give each LoRA once, with one scale.")
    count = len(params.image_sources())
    if not 1 <= count <= settings.max_input_images:
        raise InputError(
            f"Input images (image_url, image_base64 and images together) must number from 1 to "
            f"{settings.max_input_images}; got {count}."
        )
    return params


def default_loras(settings: Settings) -> list[LoraInput]:
    """`LORAS` as LoRA entries, or a `ConfigError` sentence naming the entry."""
    from config import ConfigError

    entries = []
    for i, entry in enumerate(settings.default_loras):
        try:
            entries.append(LoraInput.model_validate(entry))
        except ValidationError as error:
            problem = error.errors()[0]
            field = ".".join(str(part) for part in problem.get("loc", ())) or "entry"
            raise ConfigError(f"LORAS entry {i} has an unusable '{field}': it must be {LORA_RULES.get(field, 'valid')}.") from None
    if len(entries) > settings.max_loras:
        raise ConfigError(f"LORAS holds {len(entries)} LoRAs; MAX_LORAS allows {settings.max_loras}.")
    return entries


def resolve_seed(params: EditInput) -> int:
    return params.seed if params.seed is not None else random.SystemRandom().randint(0, MAX_SEED)


def _sentence(error: dict) -> str:
    loc = error.get("loc") or ("input",)
    field = str(loc[0])
    if field == "loras" and len(loc) > 2:  # ("loras", i, "path")
        name = f"loras[{loc[1]}].{loc[2]}"
        if error["type"] == "extra_forbidden":
            return f"Unknown field '{name}'; a LoRA takes path, weight_name and scale."
        if error["type"] == "missing":
            return f"Input field '{name}' is required: it must be {LORA_RULES.get(str(loc[2]), 'valid')}."
        return f"Input field '{name}' must be {LORA_RULES.get(str(loc[2]), 'valid')}; got {_shown(error.get('input'))}."
    if error["type"] == "extra_forbidden":
        guess = FIELD_ALIASES.get(field) or next(iter(difflib.get_close_matches(field, FIELD_RULES, n=1)), None)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        return f"Unknown input field '{field}'{hint}; allowed fields are {', '.join(FIELD_RULES)}."
    rule = FIELD_RULES.get(field, "valid")
    if error["type"] == "string_unicode":  # a lone surrogate (JSON "\\ud800") is not text
        return f"Input field '{field}' is not valid Unicode text (it holds a lone surrogate escape); send UTF-8 text."
    if error["type"] == "missing":
        return f"Input field '{field}' is required: it must be {rule}."
    if error["type"] == "value_error" and "control token" in error["msg"]:
        token = error["msg"].rsplit(" ", 1)[-1]
        return f"Input field '{field}' contains {token}, one of the model's control tokens; prompts are plain text, remove it."
    if len(loc) > 1:
        item_rule = ITEM_RULES.get(field, rule)
        return f"Input field '{field}' item {loc[1]} must be {item_rule}; got {_shown(error.get('input'))}."
    return f"Input field '{field}' must be {rule}; got {_shown(error.get('input'))}."


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
