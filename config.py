"""Every environment variable the worker reads, parsed once into a frozen `Settings`.

This is the only module that touches `os.environ`. A bad value raises `ConfigError`
with a sentence naming the variable and what it allows; `handler.py` turns that into
an exit before the worker takes a job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Mapping

TINY_MODEL_ID = "tiny-random"
PRECISION_MODES = ("bf16", "8bit", "4bit", "fp8")
OFFLOAD_MODES = ("none", "model", "sequential", "auto")
GPU_PARALLELISM_MODES = ("auto", "single", "replicas", "context")
LIGHTNING_STEP_CHOICES = (4, 8)
RUNPOD_VOLUME = "/runpod-volume"  # where RunPod mounts an endpoint's network volume
RUNPOD_HF_CACHE = "/runpod-volume/huggingface-cache/hub"  # RunPod's model cache (the endpoint's "Model")
# Files baked into the image at build time (`./build.sh IMAGE TAG --bake-lightning 8`), in
# huggingface_hub's cache layout: looked in after MODEL_DIR and RunPod's cache.
IMAGE_HF_CACHE = "/app/hf-cache"
CONTAINER_MODELS = "/models"  # made by the image (Dockerfile): the container's own disk
CONTAINER_MODEL_DIR = "/models/qwen_image_edit_2509"
VOLUME_MODEL_DIR_NAME = "qwen-edit-worker"
STOCK_REFERENCE_AREA = 1024 * 1024  # what diffusers' pipeline encodes references at
TINY_REFERENCE_AREA = 64 * 64

# The worker's own attention choices besides diffusers' backends: `auto` is FlashAttention-3
# where it runs (Hopper, bfloat16, fa3-fwd installed) and `native` elsewhere; `fa3` insists on it.
WORKER_ATTENTION = ("auto", "fa3")
# Attention that applies the padded text's mask. diffusers' other backends either raise on a
# mask (flash, sage, ...) or, the varlen ones, assume the valid keys come first, which Qwen's
# joint [text | padding | image] layout breaks: with those, texts are never padded. The
# worker's FA3 orders the keys so that they do (`flash_attention`).
MASKED_ATTENTION_BACKENDS = (*WORKER_ATTENTION, "native", "_native_cudnn", "_native_efficient", "_native_math", "flex",
                             "xformers")  # fmt: skip

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """An environment variable holds a value the worker cannot use."""


@dataclass(frozen=True)
class Settings:
    model_id: str = "Qwen/Qwen-Image-Edit-2509"
    model_dir: str = CONTAINER_MODEL_DIR
    hf_cache_dirs: tuple[str, ...] = (RUNPOD_HF_CACHE, IMAGE_HF_CACHE)
    precision_mode: str = "bf16"
    use_lightning_lora: bool = True
    lightning_steps: int = 8
    lightning_repo: str = "lightx2v/Qwen-Image-Lightning"
    lightning_weight_name: str = ""
    cpu_offload: str = "auto"
    attention_backend: str = "auto"
    vae_tiling: bool = False
    vae_slicing: bool = False
    reference_image_area: int = STOCK_REFERENCE_AREA
    batch_cfg: bool = False
    compile_transformer: bool | None = None  # None: auto (on a GPU)
    compile_while_loading: bool = True
    max_concurrency: int = 8
    max_batch_size: int = 4
    batch_wait_ms: int = 50
    # Image tokens (output + references, 16x16 pixels each) up to which a job shares a batch.
    # Measured (compiled, one H200): 256² + 256² (512) ×1.74 at batch 2; 512² + 512² (2,048)
    # ×1.06; 512² + 1024² (5,120) ×1.01; 1024² + 1024² (8,192) ×1.00. Above it a job runs alone.
    batch_max_tokens: int = 2048
    max_input_images: int = 3
    max_image_bytes: int = 20 * 1024 * 1024
    # Not a variable: MODEL_DIR when it is on another filesystem than the container's own disk
    # (a network volume), where the compile cache is mirrored; None when it is local.
    compile_cache_mirror: str | None = None
    max_image_pixels: int = 4096 * 4096
    image_download_timeout_s: float = 15.0
    allow_private_image_urls: bool = False
    save_output_dir: str = ""
    bucket_endpoint_url: str = ""
    bucket_access_key_id: str = ""
    bucket_secret_access_key: str = field(default="", repr=False)
    bucket_name: str = ""
    # RunPod drops results over 10 MB from /run (20 MB from /runsync).
    max_response_bytes: int = 10_000_000
    max_loras: int = 3
    max_lora_bytes: int = 2 * 1024**3  # real files are 100 MB to 1.7 GB
    lora_download_timeout_s: float = 300.0
    lora_cache_gb: float = 50.0
    max_loaded_loras: int = 8
    max_lora_rank: int = 64
    gpu_parallelism: str = "auto"  # auto: a replica on every GPU when there are several; context: one job across them
    gpu_count: int = 0  # GPUs to use; 0: every visible one (on a CPU: CPU replicas, for tests)
    replica_processes: bool = True  # replicas on GPUs 1.. in processes of their own (false: threads of this one)
    # LoRAs applied to every job that does not send `loras` (an endpoint serving a fixed set).
    default_loras: tuple = ()

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY_MODEL_ID

    @property
    def uses_bitsandbytes(self) -> bool:
        """4bit and 8bit quantize at load through bitsandbytes (CUDA only, weights placed by it)."""
        return self.precision_mode in ("8bit", "4bit")

    @property
    def attention_takes_masks(self) -> bool:
        return self.attention_backend in MASKED_ATTENTION_BACKENDS

    @property
    def uploads_to_bucket(self) -> bool:
        return bool(self.bucket_endpoint_url and self.bucket_access_key_id and self.bucket_secret_access_key)

    @property
    def default_steps(self) -> int:
        return self.lightning_steps if self.use_lightning_lora else 40

    @property
    def default_true_cfg_scale(self) -> float:
        # Lightning is distilled without classifier-free guidance.
        return 1.0 if self.use_lightning_lora else 4.0

    @classmethod
    def from_env(cls, environ: "Mapping[str, str] | _Env | None" = None, runpod_volume: str = RUNPOD_VOLUME) -> "Settings":
        env = environ if isinstance(environ, _Env) else _Env(os.environ if environ is None else environ)
        model_id = _model_id(env.text("MODEL_ID", cls.model_id))
        steps = env.choice_int("LIGHTNING_STEPS", cls.lightning_steps, LIGHTNING_STEP_CHOICES)
        max_batch = env.integer("MAX_BATCH_SIZE", cls.max_batch_size, 1, 64)
        reference_default = TINY_REFERENCE_AREA if model_id == TINY_MODEL_ID else STOCK_REFERENCE_AREA
        settings = cls(
            model_id=model_id,
            model_dir=env.text("MODEL_DIR", default_model_dir(runpod_volume)),
            precision_mode=env.choice("PRECISION_MODE", cls.precision_mode, PRECISION_MODES),
            use_lightning_lora=env.boolean("USE_LIGHTNING_LORA", cls.use_lightning_lora),
            lightning_steps=steps,
            lightning_repo=env.text("LIGHTNING_REPO", cls.lightning_repo),
            lightning_weight_name=env.text("LIGHTNING_WEIGHT_NAME", default_lightning_weight(steps)),
            cpu_offload=env.choice("CPU_OFFLOAD", cls.cpu_offload, OFFLOAD_MODES),
            attention_backend=env.choice("ATTENTION_BACKEND", cls.attention_backend, attention_backends),
            vae_tiling=env.boolean("VAE_TILING", cls.vae_tiling),
            vae_slicing=env.boolean("VAE_SLICING", cls.vae_slicing),
            reference_image_area=env.integer("REFERENCE_IMAGE_AREA", reference_default, 64 * 64, 2048 * 2048),
            # Two batches' worth: one batch runs on the GPU while the next one fills.
            batch_cfg=env.boolean("CFG_BATCHING", cls.batch_cfg),
            compile_transformer=env.auto_boolean("COMPILE_TRANSFORMER"),
            compile_while_loading=env.boolean("COMPILE_WHILE_LOADING", cls.compile_while_loading),
            max_concurrency=env.integer("MAX_CONCURRENCY", 2 * max_batch, 1, 256, derived=True),
            max_batch_size=max_batch,
            batch_wait_ms=env.integer("BATCH_WAIT_MS", cls.batch_wait_ms, 0, 10_000),
            batch_max_tokens=env.integer("BATCH_MAX_TOKENS", cls.batch_max_tokens, 0, 1_000_000),
            max_input_images=env.integer("MAX_INPUT_IMAGES", cls.max_input_images, 1, 16),
            max_image_bytes=env.integer("MAX_IMAGE_BYTES", cls.max_image_bytes, 1024, 200 * 1024 * 1024),
            max_image_pixels=env.integer("MAX_IMAGE_PIXELS", cls.max_image_pixels, 64 * 64, 100_000_000),
            image_download_timeout_s=env.number("IMAGE_DOWNLOAD_TIMEOUT_S", cls.image_download_timeout_s, 0.1, 600),
            allow_private_image_urls=env.boolean("ALLOW_PRIVATE_IMAGE_URLS", cls.allow_private_image_urls),
            save_output_dir=env.text("SAVE_OUTPUT_DIR", cls.save_output_dir),
            # The bucket variables are the ones RunPod's rp_upload documents.
            bucket_endpoint_url=env.text("BUCKET_ENDPOINT_URL", cls.bucket_endpoint_url),
            bucket_access_key_id=env.text("BUCKET_ACCESS_KEY_ID", cls.bucket_access_key_id),
            bucket_secret_access_key=env.text("BUCKET_SECRET_ACCESS_KEY", ""),
            bucket_name=env.text("BUCKET_NAME", cls.bucket_name),
            max_response_bytes=env.integer("MAX_RESPONSE_BYTES", cls.max_response_bytes, 100_000, 100_000_000),
            max_loras=env.integer("MAX_LORAS", cls.max_loras, 0, 8),
            max_lora_bytes=env.integer("MAX_LORA_BYTES", cls.max_lora_bytes, 1024**2, 16 * 1024**3),
            lora_download_timeout_s=env.number("LORA_DOWNLOAD_TIMEOUT_S", cls.lora_download_timeout_s, 1, 3600),
            lora_cache_gb=env.number("LORA_CACHE_GB", cls.lora_cache_gb, 0.1, 10_000),
            max_loaded_loras=env.integer("MAX_LOADED_LORAS", cls.max_loaded_loras, 1, 64),
            max_lora_rank=env.integer("MAX_LORA_RANK", cls.max_lora_rank, 1, 512),
            gpu_parallelism=env.choice("GPU_PARALLELISM", cls.gpu_parallelism, GPU_PARALLELISM_MODES),
            gpu_count=env.integer("GPU_COUNT", cls.gpu_count, 0, 16),
            replica_processes=env.boolean("REPLICA_PROCESSES", cls.replica_processes),
            default_loras=env.json_list("LORAS"),
        )
        if _on_another_filesystem(settings.model_dir, tempfile.gettempdir()):
            settings = dataclasses.replace(settings, compile_cache_mirror=settings.model_dir)
        if settings.gpu_parallelism == "context":
            _check_context_parallel(settings)
        if settings.precision_mode == "fp8" and settings.default_loras:
            raise ConfigError(
                "LORAS cannot be used with PRECISION_MODE=fp8: the float8 transformer takes no LoRA adapters; use "
                "PRECISION_MODE bf16, 8bit or 4bit, or leave LORAS unset."
            )
        if settings.batch_cfg and not settings.attention_takes_masks:
            raise ConfigError(
                f"CFG_BATCHING=true pads the negative prompt to the prompt's length, which ATTENTION_BACKEND="
                f"{settings.attention_backend} cannot mask; use one of {', '.join(MASKED_ATTENTION_BACKENDS)}, "
                "or CFG_BATCHING=false."
            )
        return settings


def _check_context_parallel(settings: Settings) -> None:
    """What GPU_PARALLELISM=context does not take yet, each refused with a sentence."""
    if settings.uses_bitsandbytes:
        raise ConfigError(f"GPU_PARALLELISM=context needs PRECISION_MODE bf16 or fp8; got {settings.precision_mode}.")
    if settings.cpu_offload not in ("auto", "none"):
        raise ConfigError(f"GPU_PARALLELISM=context keeps every weight on the GPUs: CPU_OFFLOAD must be auto or none; got {settings.cpu_offload}.")


def _model_id(value: str) -> str:
    """MODEL_ID is the tiny model, a folder, or a Hugging Face repo id; a path that names no
    folder would otherwise surface as huggingface_hub's validation traceback at start."""
    if value == TINY_MODEL_ID or os.path.isdir(value):
        return value
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ConfigError(
            f"MODEL_ID must be a Hugging Face repo id (owner/name) or an existing folder holding the pipeline; got {value!r}."
        ) from None
    return value


def default_model_dir(runpod_volume: str = RUNPOD_VOLUME) -> str:
    """On the network volume when one is mounted, so that weights, LoRAs and the compile
    cache outlive the worker; else on the container disk. (RunPod's model cache lives under
    the same path but is not a mount of it, so it does not count as a volume.) Outside the
    image (a local run), in the user's cache folder rather than a new folder under `/`."""
    if os.path.ismount(runpod_volume):
        return os.path.join(runpod_volume, VOLUME_MODEL_DIR_NAME)
    if os.path.isdir(CONTAINER_MODELS):
        return os.path.join(CONTAINER_MODELS, os.path.basename(CONTAINER_MODEL_DIR))
    return os.path.join(os.path.expanduser("~"), ".cache", VOLUME_MODEL_DIR_NAME)


def _on_another_filesystem(path: str, local: str) -> bool:
    """Whether `path` (or, before it exists, its nearest existing parent) lives on another
    filesystem than `local`."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return os.stat(path).st_dev != os.stat(local).st_dev
    except OSError:
        return False


def compile_cache_dir(settings: Settings) -> str:
    """Where torch.compile's cache is written: with the weights when they are on the container's
    disk; on the container's disk, mirrored to the volume, when they are on a volume (its
    thousands of small files are slow over a network filesystem)."""
    if settings.compile_cache_mirror:
        return os.path.join(tempfile.gettempdir(), "qwen-edit-worker", "torchinductor")
    return os.path.join(settings.model_dir, "torchinductor")


# Variables that libraries read themselves, offered to deployers beside the worker's own.
LIBRARY_VARIABLES = ("HF_TOKEN",)  # huggingface_hub: gated or private models and LoRAs


def export_library_settings(settings: Settings) -> None:
    """Environment that libraries read themselves: torch.compile's cache directory. A cache
    directory the user chose is kept; torch's own default is not a choice (importing diffusers
    writes it into the environment), so it is replaced."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or current == _inductor_default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir(settings)


def inductor_cache_dir() -> str | None:
    """The compile cache directory in force (after `export_library_settings`)."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def _inductor_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: only an unset variable is replaced
        return None
    return os.path.abspath(default_cache_dir())


def attention_backends() -> tuple[str, ...]:
    """The worker's own choices, then the backend names diffusers' `set_attention_backend` accepts."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return (*WORKER_ATTENTION, *(backend.value for backend in AttentionBackendName))


def variable_names() -> list[str]:
    """Every environment variable `Settings.from_env` reads, in order (for docs and tests)."""
    return list(variable_specs())


def variable_specs() -> dict[str, "VariableSpec"]:
    """What each variable takes and its default, as `Settings.from_env` reads it with nothing
    set and no volume mounted (for the RunPod Hub manifest and its test)."""
    env = _Env({})
    Settings.from_env(env, runpod_volume="/nonexistent")
    return env.specs


@dataclass(frozen=True)
class VariableSpec:
    kind: str  # "string", "boolean" or "number", as RunPod's Hub names input types
    default: object
    choices: tuple | Callable[[], tuple] = ()  # the values allowed, for a choice (a callable: looked up when asked)
    derived: bool = False  # the default follows other variables: a manifest must not fix it

    @property
    def options(self) -> tuple:
        return self.choices() if callable(self.choices) else self.choices


def default_lightning_weight(steps: int) -> str:
    return f"Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-{steps}steps-V1.0-bf16.safetensors"


class _Env:
    """Typed reads of environment variables; each failure names the variable."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ
        self.specs: dict[str, VariableSpec] = {}

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def _raw(self, name: str, kind: str = "string", default: object = "", options: tuple | Callable[[], tuple] = (),
             derived: bool = False) -> str | None:  # fmt: skip
        self.specs[name] = VariableSpec(kind, default, options, derived)
        value = self._environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name, "string", default) or default

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name, "boolean", default)
        if raw is None:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"{name} must be true or false (also 1/0, yes/no, on/off); got {raw!r}.")

    def json_list(self, name: str) -> tuple:
        """A JSON list of objects (checked in depth where it is used); empty when unset."""
        raw = self._raw(name, "string", "")
        if raw is None:
            return ()
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise ConfigError(f'{name} must be a JSON list of objects such as [{{"path": "owner/name", "scale": 0.8}}]; got {raw[:80]!r}.')
        return tuple(value)

    def auto_boolean(self, name: str) -> bool | None:
        """true, false, or auto (None): the worker decides."""
        raw = self._raw(name, "string", "auto", ("auto", "true", "false"))
        if raw is None or raw.lower() == "auto":
            return None
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{name} must be auto, true or false (also 1/0, yes/no, on/off); got {raw!r}.")

    def choice(self, name: str, default: str, allowed: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> str:
        """`allowed` may be a callable, asked only when the variable is set (ATTENTION_BACKEND's
        list comes from diffusers, which the worker must not import before its prefetch starts)."""
        raw = self._raw(name, "string", default, allowed)
        if raw is None:
            return default
        allowed = allowed() if callable(allowed) else allowed
        if raw.lower() not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {raw!r}.")
        return raw.lower()

    def choice_int(self, name: str, default: int, allowed: tuple[int, ...]) -> int:
        raw = self._raw(name, "number", default, allowed)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {raw!r}.")
        return int(raw)

    def integer(self, name: str, default: int, low: int, high: int, derived: bool = False) -> int:
        raw = self._raw(name, "number", default, derived=derived)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number from {low} to {high}; got {raw!r}.") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be a whole number from {low} to {high}; got {raw!r}.")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self._raw(name, "number", default)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number from {low:g} to {high:g}; got {raw!r}.") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be a number from {low:g} to {high:g}; got {raw!r}.")
        return value
