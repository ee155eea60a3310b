"""Build the diffusers pipeline once, lazily, as `Settings` says.

Every choice goes through a diffusers or transformers API: `PipelineQuantizationConfig`
for bitsandbytes, `load_lora_weights`/`fuse_lora` for Lightning, the pipeline's offload
methods, `set_attention_backend`, and the VAE's own tiling and slicing. Each decision is
logged with how long it took.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from config import WORKER_ATTENTION, Settings
from qwen_edit_worker.engine import compilation, compile_cache, context_parallel, flash_attention, fp8, rope_attention, stand_in
from qwen_edit_worker.engine.compilation import compile_transformer, should_compile
from qwen_edit_worker.engine.context_parallel import Ranks
from qwen_edit_worker.engine.devices import check_precision_supported, resolve_device_and_dtype
from qwen_edit_worker.engine.loaded_model import LoadedModel
from qwen_edit_worker.loras.adapters import prepare_slots
from qwen_edit_worker.loras.loading import load_lora
from qwen_edit_worker.startup.model_files import resolve_lora_path, resolve_model_path
from qwen_edit_worker.startup.startup_clock import timed

log = logging.getLogger("qwen_edit_worker.model")

# Published by the Lightning authors (ModelTC/Qwen-Image-Lightning, generate_with_diffusers.py):
# the distillation used a fixed shift of 3, so dynamic shifting is pinned to log(3).
LIGHTNING_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# The first block's image modulation is kept in full precision: quantizing it hurts quality
# far more than it saves (it is what diffusers' and the model authors' NF4 recipes skip).
NF4_SKIP_MODULES = ["transformer_blocks.0.img_mod"]
QUANTIZED_COMPONENTS = ("transformer", "text_encoder")
# Fraction of free GPU memory the weights may take before `CPU_OFFLOAD=auto` offloads:
# the rest is left for activations, which reach several GB at 1024² and batch > 1.
FIT_FRACTION = 0.8


def quantization_config(
    settings: Settings, dtype: torch.dtype, cpu_offload_int8: bool = False, components=QUANTIZED_COMPONENTS
):
    """A diffusers `PipelineQuantizationConfig` for 4bit/8bit of `components`, or None (bf16,
    and fp8, which is applied after loading so that Lightning can be fused into the weights first)."""
    if not settings.uses_bitsandbytes:
        return None
    from diffusers import BitsAndBytesConfig as DiffusersBnb
    from diffusers import PipelineQuantizationConfig
    from transformers import BitsAndBytesConfig as TransformersBnb

    if settings.precision_mode == "4bit":
        common = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        common = dict(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cpu_offload_int8)
        # LLM.int8 computes in fp16 by design; bitsandbytes says so on every matmul otherwise.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    mapping = {
        "transformer": DiffusersBnb(**common, llm_int8_skip_modules=NF4_SKIP_MODULES),
        "text_encoder": TransformersBnb(**common),
    }
    return PipelineQuantizationConfig(quant_mapping={name: mapping[name] for name in components})


def _load_pipeline(settings: Settings, path: str, dtype: torch.dtype):
    """The whole pipeline from `path` into CPU memory (bitsandbytes places its quantized layers
    on the GPU as it loads them): for offload and the quantized modes."""
    from diffusers import QwenImageEditPlusPipeline

    quant = quantization_config(settings, dtype)
    try:
        with timed(log, f"loading the pipeline ({settings.precision_mode}) from {path}"):
            return QwenImageEditPlusPipeline.from_pretrained(path, dtype=dtype, quantization_config=quant)
    except (torch.OutOfMemoryError, ValueError) as error:
        if settings.precision_mode != "8bit" or not _is_fit_error(error):
            raise
        log.warning("8-bit weights do not fit the GPU (%s): retrying with fp32 CPU offload", error)
    return _load_8bit_with_cpu_offload(settings, path, dtype)


# Loaded after the rest when the weights go straight onto the device (`_load_staged`).
TEXT_PARTS = ("text_encoder", "tokenizer", "processor")


def _load_onto(path: str, dtype: torch.dtype, onto: torch.device, what: str, **components):
    """The pipeline with every weight read straight onto `onto` (diffusers' `device_map`)
    instead of into CPU memory first; `components` given (None: left out) are not loaded."""
    from diffusers import QwenImageEditPlusPipeline

    # diffusers takes "cuda", not "cuda:1": the weights go to the thread's current device (load_model sets it).
    with timed(log, f"loading {what} from {path} onto {onto}"):
        pipe = QwenImageEditPlusPipeline.from_pretrained(path, dtype=dtype, device_map=onto.type, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_fit_error(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "dispatched on the CPU" in str(error)


def _load_8bit_with_cpu_offload(settings: Settings, path: str, dtype: torch.dtype, gpu_budget: int | None = None):
    """LLM.int8 with the modules that do not fit kept on the CPU in fp32 (bitsandbytes' own recipe)."""
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    torch.cuda.empty_cache()
    if gpu_budget is None:
        gpu_budget = int(torch.cuda.mem_get_info()[0] * FIT_FRACTION)
    quant = quantization_config(settings, dtype, cpu_offload_int8=True).quant_mapping
    with timed(log, "loading the 8-bit transformer with a CPU-offload device map"):
        transformer = QwenImageTransformer2DModel.from_pretrained(
            path,
            subfolder="transformer",
            dtype=dtype,
            quantization_config=quant["transformer"],
            device_map="auto",
            max_memory={0: gpu_budget, "cpu": "512GiB"},
        )
    # The text encoder is quantized too (8.3B parameters: 16.6 GB in bf16, half in 8-bit).
    rest = quantization_config(settings, dtype, cpu_offload_int8=True, components=("text_encoder",))
    with timed(log, "loading the rest of the pipeline (8-bit text encoder)"):
        return QwenImageEditPlusPipeline.from_pretrained(path, dtype=dtype, transformer=transformer, quantization_config=rest)


def _load_lightning(pipe, settings: Settings, quantized: bool) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    lora = Path(resolve_lora_path(settings))
    with timed(log, f"loading the Lightning LoRA {lora.name}"):
        load_lora(pipe, lora, "lightning")
    if quantized:
        log.info("Lightning stays an unfused adapter: the base weights are quantized")
    else:
        with timed(log, "fusing the Lightning LoRA into the transformer"):
            pipe.fuse_lora(lora_scale=1.0)
            pipe.unload_lora_weights()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
    log.info("scheduler: the Lightning authors' FlowMatchEuler configuration (shift 3)")


COMPONENTS = ("transformer", "text_encoder", "vae")


def planned_bytes(path: str, dtype: torch.dtype) -> dict[str, int]:
    """What each component's weights will take in memory at `dtype`, from the safetensors
    headers alone (no weight is read): the offload decision is made before loading."""
    from safetensors import safe_open

    sizes = {}
    for name in COMPONENTS:
        total = 0
        for file in sorted(Path(path, name).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as tensors:
                for key in tensors.keys():
                    tensor = tensors.get_slice(key)
                    numel = math.prod(tensor.get_shape())
                    floating = tensor.get_dtype() in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
                    total += numel * (dtype.itemsize if floating else _SAFETENSORS_ITEMSIZE.get(tensor.get_dtype(), 8))
        sizes[name] = total
    return sizes


_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


def _unplaced_bytes(pipe) -> dict[str, int]:
    """Weights still in CPU memory (bitsandbytes places its quantized models on the GPU at load)."""
    return {name: sum(p.numel() * p.element_size() for p in getattr(pipe, name).parameters())
            for name in COMPONENTS if _on_cpu(getattr(pipe, name))}  # fmt: skip


def choose_offload(settings: Settings, sizes: dict[str, int], device: torch.device) -> str:
    """`auto`: keep everything on the GPU when `sizes` (bytes per component still to place)
    fit, else offload per model, else per layer."""
    if device.type != "cuda":
        if settings.cpu_offload not in ("none", "auto"):
            log.info("CPU_OFFLOAD=%s ignored: there is no GPU", settings.cpu_offload)
        return "none"
    if settings.cpu_offload != "auto":
        return settings.cpu_offload
    if not sizes:
        return "none"
    free = torch.cuda.mem_get_info()[0]
    need, largest = sum(sizes.values()), max(sizes.values())
    choice = "none" if need <= free * FIT_FRACTION else "model" if largest <= free * FIT_FRACTION else "sequential"
    log.info("CPU_OFFLOAD=auto: weights %.1f GiB, GPU free %.1f GiB -> %s", need / 2**30, free / 2**30, choice)
    return choice


def _on_cpu(module) -> bool:
    return next(module.parameters()).device.type == "cpu"


def _place(pipe, offload: str, device: torch.device, quantized: bool) -> None:
    with timed(log, f"placing the pipeline (offload: {offload})"):
        # Named: without a device diffusers offloads onto GPU 0, whichever replica's pipeline it is.
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        elif not quantized:
            pipe.to(device)
        else:
            # bitsandbytes already put the quantized modules on the GPU; move the rest.
            pipe.vae.to(device)


def _apply_memory_options(pipe, settings: Settings) -> None:
    if settings.attention_backend not in ("native", *WORKER_ATTENTION):  # the worker's own: `flash_attention.use`
        with timed(log, f"attention backend {settings.attention_backend}"):
            pipe.transformer.set_attention_backend(settings.attention_backend)
    if pipe.vae is None:  # a context follower
        return
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
        log.info("VAE tiling on")
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
        log.info("VAE slicing on")


def load_model(
    settings: Settings,
    device: torch.device | None = None,
    replica: int = 0,
    compile_ahead: Callable[[LoadedModel], None] | None = None,
    ranks: Ranks | None = None,
) -> LoadedModel:
    """The pipeline on `device` (default: the GPU, or the CPU for the tiny model). Replicas
    after the first find the compile cache the first one restored. `compile_ahead`: the
    compile warm-up, run before the text encoder is loaded (`_load_staged`). `ranks`: the
    transformer runs across these processes (GPU_PARALLELISM=context)."""
    default_device, dtype = resolve_device_and_dtype(settings)
    device = device or default_device
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # this thread's current GPU: where device_map="cuda" loads
    check_precision_supported(settings, device)
    restoring = compile_cache.restore(settings) if settings.compile_transformer is not False and replica == 0 else None
    path = resolve_model_path(settings)
    if settings.uses_bitsandbytes:  # bitsandbytes decides where its quantized layers go as it loads them
        pipe = _load_pipeline(settings, path, dtype)
        offload = choose_offload(settings, _unplaced_bytes(pipe), device)
        return _prepared(settings, pipe, device, dtype, offload, restoring, ranks)
    # Decided from the files' headers, so that weights that fit are read straight onto the
    # GPU, and the Lightning LoRA is fused there, instead of on the CPU and then copied.
    offload = choose_offload(settings, planned_bytes(path, dtype), device)
    if offload == "none":
        return _load_staged(settings, path, device, dtype, restoring, compile_ahead, ranks)
    pipe = _load_pipeline(settings, path, dtype)
    return _prepared(settings, pipe, device, dtype, offload, restoring, ranks)


def _load_staged(settings: Settings, path: str, device: torch.device, dtype: torch.dtype, restoring,
                 compile_ahead: Callable[[LoadedModel], None] | None, ranks: Ranks | None) -> LoadedModel:  # fmt: skip
    """Weights that fit, straight onto `device`, in two steps. First the transformer and the
    VAE: Lightning fused, fp8, and compiled by `compile_ahead` (warm-up edits with
    random prompt embeddings). Then the text encoder (16.6 GB of the 58), which `prefetch` has
    been reading from disk while the compile ran, instead of the compile waiting for it. The
    followers of context mode (rank > 0) load the transformer alone."""
    follower = ranks is not None and ranks.rank > 0
    on_stand_in = settings.compile_while_loading and ranks is None and should_compile(settings, device, False, "none")
    if compile_ahead is not None and on_stand_in:
        pipe = _load_while_compiling(settings, path, device, dtype, restoring, compile_ahead)
    else:
        pipe = _transformer_and_vae(path, dtype, device, vae=not follower)
    model = _prepared(settings, pipe, device, dtype, "none", restoring, ranks)
    if compile_ahead is not None and model.compiled:
        with timed(log, "compiling before the text encoder loads"):
            compilation.warm_up(model, functools.partial(compile_ahead, model))
    if follower:
        return model  # a follower runs only the transformer: rank 0 encodes the prompts and runs the VAE
    given = {name: part for name, part in pipe.components.items() if name not in TEXT_PARTS}
    with timed(log, f"reading the text encoder from {path} onto {device}"):
        text_encoder = _text_encoder(path, dtype, device)
    model.pipe = _load_onto(path, dtype, device, "the tokenizer and the processor", text_encoder=text_encoder, **given)
    return model


def _text_encoder(path: str, dtype: torch.dtype, device: torch.device):
    """The text encoder read straight onto `device`, named: transformers takes the pipeline's
    device_map="cuda" as the first GPU, not the thread's current one (every replica's text
    encoder landed on GPU 0, seen on two H200s)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, subfolder="text_encoder", dtype=dtype,
                                                              device_map={"": device})  # fmt: skip


def _transformer_and_vae(path: str, dtype: torch.dtype, device: torch.device, vae: bool = True):
    """The pipeline without its text parts (and without the VAE: `vae` false), read straight
    onto `device` (the first step)."""
    left_out = TEXT_PARTS if vae else (*TEXT_PARTS, "vae")
    return _load_onto(path, dtype, device, "the transformer and the VAE" if vae else "the transformer",
                      **dict.fromkeys(left_out))  # fmt: skip


def _load_while_compiling(settings: Settings, path: str, device: torch.device, dtype: torch.dtype, restoring,
                          compile_ahead: Callable[[LoadedModel], None]):  # fmt: skip
    """COMPILE_WHILE_LOADING: the transformer and the VAE read on a thread while this one runs
    `compile_ahead` on a one-block stand-in (`stand_in`), whose graphs the real blocks then
    find. The stand-in is built and prepared before the read starts: diffusers' loading
    patches module construction for the whole process while it runs."""
    with timed(log, "preparing a one-block stand-in to compile on"):
        pipe = stand_in.one_block_pipeline(path, device, dtype)
        slots = _shaped(settings, pipe, device, dtype, None, True, restoring)
        model = _loaded(settings, pipe, device, dtype, "none", True, slots)

    def read():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # diffusers' device_map="cuda" means the thread's current GPU
        return _transformer_and_vae(path, dtype, device)

    with ThreadPoolExecutor(1, thread_name_prefix="weights") as pool:
        reading = pool.submit(read)
        try:
            with timed(log, "compiling on the stand-in while the weights load"):
                compile_ahead(model)
        except Exception as error:  # noqa: BLE001 - the real transformer compiles after loading instead
            log.warning("compiling on the stand-in failed (%s); compiling after loading instead", compilation.first_line(error))
        del model, pipe
        return reading.result()


def _prepared(settings: Settings, pipe, device: torch.device, dtype: torch.dtype, offload: str, restoring,
              ranks: Ranks | None = None) -> LoadedModel:  # fmt: skip
    """`pipe` made ready to serve: Lightning fused, placed, then `_shaped`."""
    pipe.set_progress_bar_config(disable=True)
    bnb_quantized = settings.uses_bitsandbytes
    if settings.use_lightning_lora:
        _load_lightning(pipe, settings, bnb_quantized)
    _place(pipe, offload, device, bnb_quantized)
    compiled = should_compile(settings, device, bnb_quantized, offload)
    slots = _shaped(settings, pipe, device, dtype, ranks, compiled, restoring)
    model = _loaded(settings, pipe, device, dtype, offload, compiled, slots)
    if ranks is not None:
        context_parallel.lead(model, ranks, settings.max_loaded_loras)  # rank 0: the followers do as it does
    return model


def _shaped(settings: Settings, pipe, device: torch.device, dtype: torch.dtype, ranks: Ranks | None, compiled: bool,
            restoring) -> tuple[str, ...]:  # fmt: skip
    """The transformer as it will run: real-valued RoPE, FlashAttention-3 where it runs, split
    across `ranks`, fp8, the attention options, the LoRA slots in context mode and the compile
    set up. Returns the slots' names (none where they are prepared later)."""
    rope_attention.install(pipe.transformer)
    flash_attention.use(pipe.transformer, settings.attention_backend, device, dtype)
    if ranks is not None:
        context_parallel.enable(pipe.transformer, ranks)
    if settings.precision_mode == "fp8":
        fp8.quantize(pipe.transformer)
    _apply_memory_options(pipe, settings)
    slots: tuple[str, ...] = ()
    if _slot_count(settings, compiled) and ranks is not None:
        # Context mode prepares them now, on every rank alike. One GPU or replicas prepare
        # them after the first warm-up (`adapters.ready_slots`): the first result does not
        # wait for 6-9 s of peft's Python, and the blocks compile once more for them then.
        with timed(log, "preparing LoRA slots"):
            slots = prepare_slots(pipe, settings.max_loras, settings.max_lora_rank)
    if restoring is not None:
        restoring.join()  # the mirrored compile cache, copied while the weights loaded
    if compiled:
        compile_transformer(pipe, settings)
    return slots


def _loaded(settings: Settings, pipe, device: torch.device, dtype: torch.dtype, offload: str, compiled: bool,
            slots: tuple[str, ...]) -> LoadedModel:  # fmt: skip
    precision = (
        settings.precision_mode
        if settings.precision_mode != "bf16"
        else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    )
    base_adapters = ("lightning",) if settings.use_lightning_lora and settings.uses_bitsandbytes else ()
    count = _slot_count(settings, compiled)
    return LoadedModel(pipe, device, dtype, precision, settings.use_lightning_lora, offload, compiled, base_adapters,
                       lora_slots=slots, lora_slot_count=count, lora_rank=settings.max_lora_rank if count else 0)  # fmt: skip


def _slot_count(settings: Settings, compiled: bool) -> int:
    """LoRA slots for a compiled transformer (fp8's layers take no LoRA): per-request LoRAs are
    then hot-swapped into them without recompiling."""
    return settings.max_loras if compiled and settings.precision_mode != "fp8" else 0


class ModelHolder:
    """Loads the model on first use, once, whichever thread asks first."""

    def __init__(self, settings: Settings, device: torch.device | None = None, replica: int = 0,
                 compile_ahead: Callable[[LoadedModel], None] | None = None,
                 join_ranks: Callable[[], Ranks] | None = None):  # fmt: skip
        """`join_ranks`: rank 0's place among the GPU processes (GPU_PARALLELISM=context),
        asked for when the model loads."""
        self._settings = settings
        self.device = device
        self.replica = replica
        self._compile_ahead = compile_ahead
        self._join_ranks = join_ranks
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._error: BaseException | None = None

    def get(self) -> LoadedModel:
        with self._lock:
            if self._error is not None:
                raise RuntimeError(f"the model failed to load: {self._error}") from self._error
            if self._model is None:
                try:
                    with timed(log, "loading the model" + (f" onto {self.device}" if self.replica else "")):
                        ranks = self._join_ranks() if self._join_ranks is not None else None
                        self._model = load_model(self._settings, self.device, self.replica, self._compile_ahead, ranks)
                except BaseException as error:
                    self._error = error
                    raise
            return self._model
