"""Run a batch of compatible edit requests through the pipeline's components.

diffusers' `QwenImageEditPlusPipeline.__call__` refuses more than one prompt, but its
transformer batches fine when every sample has the same image shapes: text of unequal
length is padded and masked through `encoder_hidden_states_mask`. So this module
reuses the pipeline's own helpers (prompt encoding, latent preparation, timesteps,
dimensions) and writes only the batched denoising loop. Guarantees, tested on the tiny
model in float32:

- a batch of one gives what `QwenImageEditPlusPipeline.__call__` gives for the same
  inputs and seed (with the same reference-image area);
- a request's result does not depend on which requests shared its batch: its noise
  comes from its own generators, and image k of a request is seeded with `seed + k`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    calculate_dimensions,
    calculate_shift,
    retrieve_timesteps,
)
from PIL import Image

from config import Settings
from qwen_edit_worker.engine import compilation
from qwen_edit_worker.engine.loaded_model import LoadedModel
from qwen_edit_worker.engine.side_stream import SideStream
from qwen_edit_worker.loras.adapters import AdapterCache, AppliedLora, ready_slots
from qwen_edit_worker.loras.lora_files import LoraError

log = logging.getLogger("qwen_edit_worker.engine")

# Output sides are multiples of this: the VAE downsamples by 8 and latents are packed
# in 2x2 patches (the tiny model's VAE downsamples by 4, so 16 suits it too).
OUTPUT_MULTIPLE = 16
DEFAULT_OUTPUT_AREA = 1024 * 1024  # the stock pipeline's default output size
MIN_DERIVED_SIDE, MAX_DERIVED_SIDE = 64, 2048  # what the schema allows for a side given
SIDE_STEP = 32  # calculate_dimensions rounds sides to multiples of this
BLANK_NEGATIVE_PROMPT = " "  # what Qwen's examples use to switch classifier-free guidance on

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class EditRequest:
    """One job's edit, with images already decoded and defaults already filled in."""

    prompt: str
    images: tuple[Image.Image, ...]
    seed: int
    num_inference_steps: int
    true_cfg_scale: float
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    loras: tuple[AppliedLora, ...] = ()  # user LoRAs, applied on top of the model
    # Called on the GPU thread after each denoising step with (step, total_steps).
    progress: StepCallback | None = field(default=None, compare=False, repr=False)
    # The prompt embeddings being computed ahead of the batch (`EditEngine.encode_ahead`).
    prompts: Future | None = field(default=None, compare=False, repr=False)

    @property
    def do_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0


@dataclass
class EditResult:
    images: list[np.ndarray]  # float32 HxWx3 in [0, 1], one per requested image
    width: int
    height: int
    batch_size: int  # how many requests shared the GPU batch
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """The pixel sizes a request works at; what must match within a batch."""

    width: int
    height: int
    reference_sizes: tuple[tuple[int, int], ...]  # (width, height) of each VAE reference

    @property
    def key(self) -> tuple:
        return (self.width, self.height, self.reference_sizes)

    @property
    def image_tokens(self) -> int:
        """The transformer's image tokens for one output image: its own and its references' (16x16 pixels each)."""
        return sum(w * h for w, h in ((self.width, self.height), *self.reference_sizes)) // 256


def round_to_multiple(side: int) -> int:
    return max(OUTPUT_MULTIPLE, side // OUTPUT_MULTIPLE * OUTPUT_MULTIPLE)


def aspect_side(request: EditRequest) -> float | None:
    """The side not given, at the last image's aspect ratio, before the side limits (None
    unless exactly one side is given)."""
    last_width, last_height = request.images[-1].size
    if request.width is not None and request.height is None:
        return request.width * last_height / last_width
    if request.height is not None and request.width is None:
        return request.height * last_width / last_height
    return None


def _clamp_side(side: float) -> int:
    return int(min(MAX_DERIVED_SIDE, max(MIN_DERIVED_SIDE, round(side))))


def _within_side_limits(width: float, height: float) -> tuple[int, int]:
    """Shrink to fit the largest side allowed, keeping the ratio; then hold each side in the limits."""
    shrink = min(1.0, MAX_DERIVED_SIDE / max(width, height, 1))
    return _clamp_side(width * shrink), _clamp_side(height * shrink)


def _dimensions(area: int, image: Image.Image) -> tuple[int, int]:
    """diffusers' `calculate_dimensions` for the image's ratio, with no side below one 32-pixel
    step: for a sliver (1:576) it rounds a side to 0, which the stock pipeline fails on."""
    width, height = calculate_dimensions(area, image.size[0] / image.size[1])
    return max(SIDE_STEP, width), max(SIDE_STEP, height)


WARM_UP_PROMPTS = ("warm up", "warm up the compiled transformer with a somewhat longer prompt")
# Before the text encoder is loaded, random prompt embeddings of these lengths stand in for
# the prompts (about what a prompt and one image's vision tokens make; any two lengths do).
# The first compiles a graph symbolic in the text length (`compilation`); the second then
# compiles nothing, unless something pinned the length, and then it compiles the graph
# that other lengths use, at start rather than on a job.
WARM_UP_TEXT_TOKENS = (200, 231)
BATCH_WARM_UP_SIDE = 256  # only jobs this small share batches (`batch_limit`)


@dataclass(frozen=True)
class _WarmUp:
    """One warm-up edit: a request per prompt, each of `images` images, with `slots` LoRA slots
    on; with `text_tokens`, random prompt embeddings that long instead of encoded prompts; with
    `ready_slots`, after the LoRA slots are prepared (`adapters.ready_slots`), none on."""

    prompts: tuple[str, ...] = WARM_UP_PROMPTS[:1]
    images: int = 1
    slots: int = 0
    text_tokens: int | None = None
    ready_slots: bool = False

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images

    @property
    def label(self) -> str:
        if self.text_tokens:
            return f" (random prompt embeddings of {self.text_tokens} tokens)"
        if self.ready_slots:
            return " (LoRA slots prepared, none on)"
        if self.slots:
            return f" ({self.slots} LoRA slots on)"
        return f" (batch of {self.batch})" if self.batch > 1 else ""


class EditEngine:
    def __init__(self, settings: Settings, model: Callable[[], LoadedModel]):
        self._settings = settings
        self._model = model
        self.default_output_area = settings.reference_image_area if settings.is_tiny else DEFAULT_OUTPUT_AREA
        self._idle_warm_ups: list[_WarmUp] = []
        self._warm_up_running = False  # the last idle warm-up is off the list but still compiling
        # Whether batches may form (`batch_limit`): set once the model serves (`start_serving`),
        # and on a compiled model once the batch graphs are compiled too (`warm_up_idle`).
        self._batch_graphs = False
        self._batch_steps_queued = False  # `want_batch_graphs` has queued the batch warm-ups
        self._batching_said: set[tuple] = set()  # shapes whose batching `batch_limit` has logged
        self._compiled_ahead = False
        self._prompt_side = SideStream("prompt-encoder")
        self._prompt_lock = threading.Lock()  # one prompt encoding at a time: the tokenizer is not thread-safe

    def plan(self, request: EditRequest) -> _Plan:
        references = tuple(_dimensions(self._settings.reference_image_area, img) for img in request.images)
        width, height = self.output_size(request)
        return _Plan(width=width, height=height, reference_sizes=references)

    def output_size(self, request: EditRequest) -> tuple[int, int]:
        """The size asked for; a side not given follows the last image's aspect ratio (both
        missing: about the default area at that ratio, shrunk to fit). Whatever the inputs'
        shapes, each side stays in 64-2048."""
        width, height = request.width, request.height
        if width is None and height is None:
            last_width, last_height = request.images[-1].size
            width, height = _within_side_limits(*calculate_dimensions(self.default_output_area, last_width / last_height))
        elif height is None:
            height = _clamp_side(aspect_side(request))
        elif width is None:
            width = _clamp_side(aspect_side(request))
        return round_to_multiple(width), round_to_multiple(height)

    def warm_up(self) -> None:
        """Compile for the most common shape (the default output size, one square reference)
        before the first job: two prompt lengths, so that later lengths reuse one
        dynamic-shape graph. What can wait is done afterwards, while the GPU is idle
        (`warm_up_idle`): the LoRA slots prepared and their graphs for none and 1 to
        `MAX_LORAS` active slots compiled, then batches, once a job could share one."""
        model = self._model()
        # After `compile_ahead` one edit is left to do: the text encoder's and the VAE's first run.
        for prompt in WARM_UP_PROMPTS[:1] if self._compiled_ahead else WARM_UP_PROMPTS:
            self._warm_up_edit(model, _WarmUp(prompts=(prompt,)))
        slots = [_WarmUp(slots=count) for count in range(1, model.lora_slot_count + 1)]
        if slots and not model.lora_slots:
            slots.insert(0, _WarmUp(ready_slots=True))
        self._idle_warm_ups = slots  # batches' graphs: once a job could share a batch (`want_batch_graphs`)

    def compile_ahead(self, model: LoadedModel) -> None:
        """`warm_up`'s compiling, on a model whose text encoder is not loaded yet (`model_loader`
        loads it afterwards, while the weights are still coming from disk): the same edits
        with random prompt embeddings of two lengths, which give the same graphs."""
        for tokens in WARM_UP_TEXT_TOKENS:
            self._warm_up_edit(model, _WarmUp(text_tokens=tokens))
        self._compiled_ahead = True

    def _batch_warm_ups(self) -> list[_WarmUp]:
        """Batches of 2 and then 3 requests (texts of unequal length, padded and masked, where
        the attention backend masks), then one request of 2 images (no mask). Dynamo
        specialises the batch dimension until it has seen two sizes above 1: without these,
        each batch size the batcher tried compiled on live jobs (15-30 s at 1024² on an H200)."""
        limit = self._settings.max_batch_size
        if limit < 2:
            return []
        if self._settings.attention_takes_masks:
            # The second batch's longest text is shorter than the first's: both dimensions vary.
            steps = [_WarmUp(prompts=WARM_UP_PROMPTS), _WarmUp(prompts=("warm up", "warm up a batch", "of three"))]
        else:  # only equal texts share a batch: one request of several images is such a batch
            steps = [_WarmUp(images=2), _WarmUp(images=3)]
        steps = [step for step in steps if len(step.prompts) * step.images <= limit]
        return steps + ([_WarmUp(images=2)] if self._settings.attention_takes_masks else [])

    def warm_up_idle(self) -> bool:
        """Run the next idle warm-up (one 1-step edit); whether more remain. A job that needs
        a graph not compiled yet runs without it (`compilation.serving`)."""
        if not self._idle_warm_ups:
            return False
        self._warm_up_running = True
        try:
            step = self._idle_warm_ups.pop(0)
            self._warm_up_edit(self._model(), step)
            while step.batch > 1 and self._idle_warm_ups and self._idle_warm_ups[0].batch > 1:
                # the batch graphs in one go: a job that comes meanwhile waits for them once, not once each
                step = self._idle_warm_ups.pop(0)
                self._warm_up_edit(self._model(), step)
        finally:
            self._warm_up_running = False
        if self._batch_steps_queued and not any(s.batch > 1 for s in self._idle_warm_ups):
            self._batch_graphs = True  # the batch warm-ups are done: batches may form
        return bool(self._idle_warm_ups)

    def want_batch_graphs(self) -> None:
        """Queue the batch warm-ups (`_batch_warm_ups`) for the GPU's next idle moments, once:
        a worker whose jobs are all too large to share a batch (`batch_limit`) never spends
        an idle moment, which a job arriving then would wait for, compiling them."""
        if self._batch_steps_queued:
            return
        self._batch_steps_queued = True
        steps = self._batch_warm_ups()
        self._idle_warm_ups.extend(steps)
        if not steps:
            self._batch_graphs = True

    def start_serving(self, model: LoadedModel) -> None:
        """The model has started (and warmed up): an uncompiled one may batch from now on."""
        if not model.compiled:
            self._batch_graphs = True

    def batch_limit(self, request: EditRequest) -> int:
        """The most images a batch holding `request` may have (never loads the model: the
        batcher asks while it forms batches). Batching pays only where one image leaves the
        GPU waiting on the host: up to `BATCH_MAX_TOKENS` image tokens (larger ones run
        alone, with nothing to try). On a compiled model, only once the batch graphs are
        compiled (`warm_up_idle`): before, a batch would run uncompiled."""
        plan = self.plan(request)
        alone = plan.image_tokens > self._settings.batch_max_tokens
        if plan.key not in self._batching_said and len(self._batching_said) < 256:  # the decision per shape, once
            self._batching_said.add(plan.key)
            log.info("jobs of %dx%d with references %s (%d image tokens): %s", plan.width, plan.height,
                     plan.reference_sizes, plan.image_tokens, "run alone (above BATCH_MAX_TOKENS)" if alone else
                     f"may share batches of up to {self._settings.max_batch_size} images")  # fmt: skip
        if alone:
            return 1
        if not self._batch_graphs:
            self.want_batch_graphs()
            return 1
        return self._settings.max_batch_size

    @property
    def warming_up(self) -> bool:
        """Whether idle warm-ups remain or one is still running (`warm_up_idle`)."""
        return bool(self._idle_warm_ups) or self._warm_up_running

    def _warm_up_edit(self, model: LoadedModel, step: _WarmUp) -> None:
        # Batches at a small size: the image's length is symbolic, so their graphs serve every size.
        side = BATCH_WARM_UP_SIDE if step.batch > 1 else round_to_multiple(int(self.default_output_area**0.5))
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        edits = [EditRequest(prompt=prompt, images=(image,), seed=0, num_inference_steps=1, num_images=step.images,
                             true_cfg_scale=self._settings.default_true_cfg_scale, width=side, height=side,
                             prompts=_random_prompts(model, step.text_tokens) if step.text_tokens else None)
                 for prompt in step.prompts]  # fmt: skip
        adapters = self._adapters(model)
        start = time.perf_counter()
        if step.ready_slots:
            ready_slots(model)
        adapters.use_slots(model, step.slots)  # whatever the slots hold: the output is not used
        try:
            with torch.inference_mode():
                self._run(model, edits)
        finally:
            adapters.use_slots(model, 0)  # the next batch sets its own
        log.info("warm-up edit%s took %.1f s", step.label, time.perf_counter() - start)

    def batch_key(self, request: EditRequest) -> Hashable:
        """Requests with equal keys can share one transformer batch. With an attention backend
        that cannot mask padding, only requests whose texts have the same length may: the
        same prompts and the same condition-image sizes (their vision tokens are text too)."""
        loras = tuple((lora.file.sha256, lora.scale) for lora in request.loras)
        key = (*self.plan(request).key, request.num_inference_steps, request.do_cfg, loras)
        if self._settings.attention_takes_masks:
            return key
        conditions = tuple(condition_size(image) for image in request.images)
        return (*key, conditions, request.prompt, request.negative_prompt if request.do_cfg else None)

    def prepare_loras(self, loras: tuple[AppliedLora, ...]) -> None:
        """Load (or swap in) `loras` now, as a batch with them would, then switch back to none."""
        model = self._model()
        self._adapters(model).apply(model, loras)
        self._adapters(model).apply(model, ())

    def _adapters(self, model: LoadedModel) -> AdapterCache:
        """The user LoRAs of the model: its own state, shared by every engine that uses it."""
        if model.adapters is None:
            model.adapters = AdapterCache(self._settings.max_loaded_loras)
        return model.adapters

    def run_batch(self, requests: Sequence[EditRequest]) -> list[EditResult]:
        if len({self.batch_key(r) for r in requests}) != 1:
            raise ValueError("run_batch needs requests with one batch key")
        model = self._model()
        # Outside inference mode: weights swapped in under it become plain tensors, not
        # parameters, which the compiled blocks' guards see as a change (a recompilation).
        self._adapters(model).apply(model, requests[0].loras)
        with torch.inference_mode(), compilation.serving(model):  # no job waits for a compile
            return self._run(model, requests)

    def _run(self, model: LoadedModel, requests: Sequence[EditRequest]) -> list[EditResult]:
        pipe = model.pipe
        plan = self.plan(requests[0])
        timings: dict[str, float] = {}

        start = time.perf_counter()
        encoded = [self._encode(pipe, request, plan, model.device, model.dtype) for request in requests]
        timings["encode"] = _ms_since(start, model.device)

        start = time.perf_counter()
        latents, masked = self._denoise(pipe, requests, encoded, plan, model.device)
        timings["denoise"] = _ms_since(start, model.device)
        _check_finite(latents, requests[0].loras)

        start = time.perf_counter()
        pixels = self._decode(pipe, latents, plan)
        pipe.maybe_free_model_hooks()
        timings["decode"] = _ms_since(start, model.device)

        log.info("batch: %d requests, %d images at %dx%d, %d steps, cfg %s, text mask %s: %s ms",
                 len(requests), sum(r.num_images for r in requests), plan.width, plan.height,
                 requests[0].num_inference_steps, requests[0].do_cfg, masked, timings)  # fmt: skip
        results, offset = [], 0
        for request in requests:
            images = list(pixels[offset : offset + request.num_images])
            offset += request.num_images
            results.append(EditResult(images, plan.width, plan.height, len(requests), dict(timings)))
        return results

    def encodes_ahead(self) -> bool:
        """Whether `encode_ahead` encodes. Not with offloading: its hooks move whole components
        on and off the GPU and assume one component runs at a time."""
        return self._model().offload == "none"

    def encode_ahead(self, request: EditRequest) -> EditRequest:
        """`request` with its prompt embeddings under way beside the GPU thread (`side_stream`),
        so that they overlap with the batches ahead of it (unchanged where `encodes_ahead` is false)."""
        if not self.encodes_ahead():
            return request
        model = self._model()
        future = self._prompt_side.submit(self._encode_prompts, model.pipe, request, model.device, device=model.device)
        return dataclasses.replace(request, prompts=future)

    def _encode_prompts(self, pipe, request: EditRequest, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's embeddings and, with CFG, the negative prompt's, as the stock pipeline makes them."""
        with self._prompt_lock:
            condition_images = resized_for_text_encoder(pipe, request.images)
            embeds, _ = pipe.encode_prompt(image=condition_images, prompt=request.prompt, device=device)
            negative = None
            if request.do_cfg:
                negative, _ = pipe.encode_prompt(
                    image=condition_images, prompt=request.negative_prompt or BLANK_NEGATIVE_PROMPT, device=device
                )
        return embeds, negative

    def _encode(self, pipe, request: EditRequest, plan: _Plan, device: torch.device, dtype: torch.dtype) -> dict:
        """Text embeddings, reference latents and noise for one request, as the stock pipeline makes them.
        `device` is the model's: the pipeline's `_execution_device` walks every module of every
        component on each call (15 ms at real size, measured). `dtype` is the embeddings' (every
        component is loaded in it), which the latents take."""
        if request.prompts is None:  # encoded here, first, in the stock pipeline's order (offload hooks follow it)
            prompts = self._encode_prompts(pipe, request, device)
        vae_images = [pipe.image_processor.preprocess(image, ref_h, ref_w).unsqueeze(2)
                      for image, (ref_w, ref_h) in zip(request.images, plan.reference_sizes)]  # fmt: skip

        channels = pipe.transformer.config.in_channels // 4
        noise, image_latents = [], None
        for k in range(request.num_images):
            generator = torch.Generator("cpu").manual_seed(request.seed + k)
            # The references are VAE-encoded once, with image 0; images 1.. only draw noise.
            sample, encoded_references = pipe.prepare_latents(
                vae_images if k == 0 else None, 1, channels, plan.height, plan.width, dtype, device, generator
            )
            noise.append(sample)
            if k == 0:
                image_latents = encoded_references
        if request.prompts is not None:
            # Made ahead, maybe on another replica's GPU, and maybe still under way on the side
            # stream: taken only now, so that the VAE's work above overlaps the text encoder's
            # host-bound forward instead of following it.
            prompts = SideStream.take(request.prompts)
        embeds, negative = (t if t is None else t.to(device) for t in prompts)
        return {"embeds": embeds, "negative": negative, "noise": noise, "image_latents": image_latents}

    def _denoise(self, pipe, requests, encoded, plan: _Plan, device: torch.device) -> tuple[torch.Tensor, bool]:
        """The denoised latents, and whether the text had to be padded and masked."""
        repeats = [r.num_images for r in requests]
        latents = torch.cat([n for e in encoded for n in e["noise"]])
        image_latents = torch.cat([e["image_latents"].expand(n, -1, -1) for e, n in zip(encoded, repeats)])
        do_cfg = requests[0].do_cfg
        # Each branch is one transformer forward: (name, text, text mask, copies of the latents).
        positive = [e["embeds"] for e in encoded]
        negative = [e["negative"] for e in encoded] if do_cfg else []
        if do_cfg and self._settings.batch_cfg:
            # Conditional and unconditional passes as one forward of twice the batch.
            branches = [("cfg", *pad_and_stack(positive + negative, repeats + repeats), 2)]
        else:
            branches = [("cond", *pad_and_stack(positive, repeats), 1)]
            if do_cfg:
                branches.append(("uncond", *pad_and_stack(negative, repeats), 1))
        if not self._settings.attention_takes_masks and any(branch[2] is not None for branch in branches):
            # batch_key keeps unequal texts apart for such backends: this is a bug, not bad input.
            raise RuntimeError(f"texts of unequal length reached ATTENTION_BACKEND={self._settings.attention_backend}")
        if do_cfg:
            # float32, as the user gave it: in bf16 a scale of 3.7 would become 3.703.
            scale = torch.tensor(
                [r.true_cfg_scale for r in requests for _ in range(r.num_images)], device=device, dtype=torch.float32
            ).view(-1, 1, 1)

        vsf = pipe.vae_scale_factor
        shapes = [(1, plan.height // vsf // 2, plan.width // vsf // 2)]
        shapes += [(1, h // vsf // 2, w // vsf // 2) for w, h in plan.reference_sizes]
        img_shapes = [shapes] * latents.shape[0]

        scheduler, timesteps = _schedule(pipe.scheduler, requests[0].num_inference_steps, latents.shape[1], device)

        def predict(t: torch.Tensor, branch: str, text: torch.Tensor, mask: torch.Tensor | None, copies: int):
            hidden = torch.cat([latents, image_latents], dim=1)
            with pipe.transformer.cache_context(branch):
                out = pipe.transformer(
                    hidden_states=hidden.repeat(copies, 1, 1) if copies > 1 else hidden,
                    timestep=t.expand(hidden.shape[0] * copies).to(latents.dtype) / 1000,
                    guidance=None,
                    encoder_hidden_states_mask=mask,
                    encoder_hidden_states=text,
                    img_shapes=img_shapes * copies,
                    attention_kwargs={},
                    return_dict=False,
                )[0]
            return out[:, : latents.shape[1]].chunk(copies)

        for i, t in enumerate(timesteps):
            predictions = [p for branch in branches for p in predict(t, *branch)]
            noise_pred = predictions[0]
            if do_cfg:
                noise_pred = apply_guidance(noise_pred, predictions[1], scale)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0].to(latents.dtype)
            for request in requests:
                if request.progress is not None:
                    request.progress(i + 1, len(timesteps))
        return latents, any(branch[2] is not None for branch in branches)

    def _decode(self, pipe, latents: torch.Tensor, plan: _Plan) -> np.ndarray:
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, plan.height, plan.width, pipe.vae_scale_factor).to(vae.dtype)
        # The stock pipeline's expression, rounding included: divide by the reciprocal std.
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents.device, latents.dtype)
        pixels = vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(pixels, output_type="np")


def _random_prompts(model: LoadedModel, tokens: int) -> Future:
    """Prompt embeddings (and a shorter negative one, for CFG) shaped as the text encoder makes them, ready."""
    width = model.pipe.transformer.config.joint_attention_dim
    embeds = [torch.randn(1, n, width, device=model.device, dtype=model.dtype) for n in (tokens, tokens - 9)]
    ready: Future = Future()
    ready.set_result(tuple(embeds))
    return ready


def condition_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) at which the text encoder sees an input image, as the stock pipeline sizes it."""
    return _dimensions(CONDITION_IMAGE_SIZE, image)


def resized_for_text_encoder(pipe, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The input images as the text encoder sees them (the stock pipeline's condition images)."""
    resized = []
    for image in images:
        width, height = condition_size(image)
        resized.append(pipe.image_processor.resize(image, height, width))
    return resized


def _schedule(base_scheduler, steps: int, image_seq_len: int, device: torch.device):
    """A private copy of the scheduler (set_timesteps and step mutate it) and its timesteps,
    set up as the stock pipeline does."""
    scheduler = copy.deepcopy(base_scheduler)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, timesteps


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Qwen's true classifier-free guidance, computed in float32 (the scheduler steps in float32
    too): uncond + scale * (cond - uncond), rescaled to keep the conditional prediction's norm."""
    cond, uncond = cond.float(), uncond.float()
    combined = uncond + scale.float() * (cond - uncond)
    return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


def pad_and_stack(embeds: Sequence[torch.Tensor], repeats: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack per-request [1, L_i, D] embeddings, each repeated, right-padded to the longest.

    The mask is None when nothing was padded, so an unpadded batch takes the transformer's
    mask-free attention path, as a single stock request does.
    """
    longest = max(e.shape[1] for e in embeds)
    rows, masks = [], []
    for e, n in zip(embeds, repeats):
        rows.append(F.pad(e, (0, 0, 0, longest - e.shape[1])).expand(n, -1, -1))
        mask = torch.zeros(n, longest, dtype=torch.long, device=e.device)
        mask[:, : e.shape[1]] = 1
        masks.append(mask)
    mask = torch.cat(masks)
    return torch.cat(rows), None if bool(mask.all()) else mask


def _check_finite(latents: torch.Tensor, loras: tuple[AppliedLora, ...]) -> None:
    """With LoRAs, NaN or infinity in the latents (weights or scales too large for bfloat16)
    would decode to a one-colour image returned as a success: fail the batch instead. Its
    requests share their LoRAs (they are in the batch key)."""
    if loras and not bool(torch.isfinite(latents).all()):
        raise LoraError("Input field 'loras' made the model's output non-finite (NaN or infinity): the LoRAs' weights "
                        "or scales are too large for this model, and no image was made.")  # fmt: skip


def _ms_since(start: float, device: torch.device) -> float:
    """Milliseconds since `start`, once the GPU has finished the stage's queued work: without
    the wait, a stage's GPU time would be billed to the next stage that reads a result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round((time.perf_counter() - start) * 1000, 1)
