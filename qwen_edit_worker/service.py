"""One job, end to end: validate, fetch images, batch onto the GPU, encode the answer.

`handler.py` stays a thin RunPod entry point; this is what it calls. Every failure a
client can cause becomes `{"error": "<one sentence>"}`; the worker keeps running.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from batching import Batcher, BatcherClosed, Lane, WorkerBroken
from config import Settings
from model_loader import ModelHolder
from qwen_edit_worker.engine import compilation, compile_cache
from qwen_edit_worker.engine.devices import breaks_the_gpu
from qwen_edit_worker.engine.edit_engine import (
    MAX_DERIVED_SIDE,
    MIN_DERIVED_SIDE,
    EditEngine,
    EditRequest,
    EditResult,
    aspect_side,
)
from qwen_edit_worker.engine.prompt_budget import PromptBudget, TextTooLong
from qwen_edit_worker.gpus import gpus
from qwen_edit_worker.gpus.context_ranks import Followers, RankLost
from qwen_edit_worker.gpus.replica_processes import ReplicaLost, ReplicaProcess
from qwen_edit_worker.jobs import fetching, images, outputs, schema
from qwen_edit_worker.loras.adapters import AppliedLora
from qwen_edit_worker.loras.lora_store import LoraStore
from qwen_edit_worker.startup import startup_clock

log = logging.getLogger("qwen_edit_worker.service")

ProgressSink = Callable[[dict, dict], None]  # (job, progress payload)
PROGRESS_EVERY_STEPS = 2


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


def _is_input_error(error: BaseException) -> bool:
    return isinstance(error, schema.InputError)


def _leaves_gpu_unusable(error: BaseException) -> bool:
    """A CUDA error (not out-of-memory) poisons the CUDA context for the whole process; a lost
    or timed-out rank leaves the ranks unable to run a forward together; a lost replica
    process can run nothing more."""
    if isinstance(error, (RankLost, ReplicaLost, torch.distributed.DistError)):
        return True
    return breaks_the_gpu(error)


class EditService:
    def __init__(
        self,
        settings: Settings,
        progress: ProgressSink | None = None,
        holder: ModelHolder | None = None,
        on_broken: Callable[[WorkerBroken], None] | None = None,
        replicas: Sequence[ModelHolder] | None = None,
    ):
        """`holder`: the one model to serve (tests pass a loaded one); `replicas`: one per
        GPU lane; neither: what GPU_PARALLELISM says (`gpus.replica_devices`)."""
        self.settings = settings
        self.followers: Followers | None = None  # GPU_PARALLELISM=context: ranks 1.. (`context_ranks`)
        self.remotes: list[ReplicaProcess] = []  # replicas 1.. in processes of their own (`replica_processes`)
        if replicas is None:
            devices = gpus.replica_devices(settings)
            if holder is not None:
                replicas = [holder]
            elif settings.gpu_parallelism == "context" and len(devices) > 1:
                self.followers = Followers(settings, devices)
                replicas = [ModelHolder(settings, devices[0], 0, compile_ahead=functools.partial(self._compile_ahead, 0),
                                        join_ranks=self.followers.join)]  # fmt: skip
            elif settings.replica_processes and len(devices) > 1:
                self.remotes = [ReplicaProcess(settings, d, n) for n, d in enumerate(devices[1:], start=1)]
                replicas = [ModelHolder(settings, devices[0], 0, compile_ahead=functools.partial(self._compile_ahead, 0))]
            else:
                replicas = [ModelHolder(settings, d, n, compile_ahead=functools.partial(self._compile_ahead, n))
                            for n, d in enumerate(devices)]  # fmt: skip
        self.replicas = list(replicas)
        self.holder = self.replicas[0]
        # One engine per replica; the first also decides batch keys and encodes prompts ahead.
        self.engines = [EditEngine(settings, replica.get) for replica in self.replicas]
        self.engine = self.engines[0]
        self._start_lock = threading.Lock()
        self._encodes = 0
        self._serving: list[int] = []  # lanes whose replica has started, in the order they did
        self.started = threading.Event()  # the first lane's model is loaded and warmed up: jobs run from now on
        # No lane serves before every replica is compiled; then nothing compiles any more.
        freeze = self._freeze_compiled if len(self.replicas) > 1 else None
        self._all_started = threading.Barrier(len(self.replicas), action=freeze)
        self.prompt_budget = PromptBudget(lambda: self.holder.get().pipe)
        # Every image and LoRA of every job the worker holds can download at once: none waits for a thread.
        self.downloads = fetching.downloads_pool(settings.max_concurrency * (settings.max_input_images + settings.max_loras))
        self.lora_store = LoraStore(settings, self.downloads)
        self.default_loras = schema.default_loras(settings)
        self._progress = progress
        lanes = [Lane(run_batch=functools.partial(self._run_batch, n), on_start=functools.partial(self._start, n),
                      on_idle=functools.partial(self._warm_up_while_idle, n)) for n in range(len(self.replicas))]  # fmt: skip
        lanes += [Lane(run_batch=remote.run_batch, on_start=functools.partial(self._start_remote, remote))
                  for remote in self.remotes]  # fmt: skip
        self.batcher: Batcher[EditRequest, EditResult] = Batcher(
            run_batch=None,
            key=self.engine.batch_key,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.batch_wait_ms / 1000,
            is_out_of_memory=_is_out_of_memory,
            is_fatal=_leaves_gpu_unusable,
            on_failure=on_broken,
            lanes=lanes,
            is_shared=_is_input_error,  # a batch's LoRAs are every request's (they are in the key)
            batch_limit=self.engine.batch_limit,
        )

    def _start(self, lane: int) -> None:
        """Load the model (and compile it) as the worker starts, not on the first job; fetch
        and load the endpoint's own LoRAs (`LORAS`), so that its first job does not wait.
        Replicas load one after another: the first serves while the next reads the weights
        from the page cache and compiles from the first one's cache."""
        engine = self.engines[lane]
        try:
            with self._start_lock:
                model = self.replicas[lane].get()
                if model.device.type == "cuda":
                    torch.cuda.set_device(model.device)  # this lane's thread works on its replica's GPU
                compilation.warm_up(model, engine.warm_up)
                if len(self.replicas) > 1:
                    engine.want_batch_graphs()
                while len(self.replicas) > 1 and self._warm_up_while_idle(lane):
                    pass  # replicas compile their LoRA slots and batches now: nothing may compile once they serve
                engine.start_serving(model)
            self._all_started.wait()
            self._serving.append(lane)
            if lane == 0:
                self.started.set()
        except BaseException:
            self._all_started.abort()  # the other lanes stop waiting: the worker is broken
            raise
        startup_clock.mark("model loaded and warmed up" + (f" (replica {lane + 1})" if lane else ""))
        if model.compiled and lane == 0:  # and again once the LoRA slots' graphs are compiled
            compile_cache.keep(self.settings)
        self._prepare_default_loras(engine.prepare_loras)

    def _start_remote(self, remote: ReplicaProcess) -> None:
        """A replica process's lane: once its model is warmed up, the endpoint's own LoRAs."""
        remote.wait_ready()
        startup_clock.mark(f"model loaded and warmed up ({remote.name})")
        self._prepare_default_loras(remote.prepare_loras)
        remote.ready.set()

    def fetch_default_loras(self) -> None:
        """Fetch and check the endpoint's own LoRAs (`LORAS`) before any job is taken: one that
        cannot be had or used makes every job fail, so it is a `ConfigError` naming `LORAS[i]`."""
        from config import ConfigError

        if not self.default_loras:
            return
        try:
            files = asyncio.run(self.lora_store.resolve(self.default_loras, setting=True))
        except schema.InputError as error:
            raise ConfigError(str(error)) from None
        self.lora_store.release(files)

    def _prepare_default_loras(self, prepare: Callable[[tuple[AppliedLora, ...]], None]) -> None:
        """Fetch and load the endpoint's own LoRAs (`LORAS`), so that its first job does not wait."""
        if not self.default_loras:
            return
        files = [self.lora_store.obtain(i, lora, setting=True) for i, lora in enumerate(self.default_loras)]
        try:
            prepare(_applied(files, self.default_loras, setting=True))
        finally:
            self.lora_store.release(files)
        log.info("LORAS ready: %s", ", ".join(lora.path for lora in self.default_loras))

    def _encoder(self) -> EditEngine | ReplicaProcess:
        """The replica whose text encoder encodes the next job's prompt ahead: each started one
        in turn, so that with N GPUs N prompts are encoded at once (any replica's embeddings
        serve any GPU; a replica process's come back in host memory). Until they have
        started, the first: asking another replica for its model would load it here, out of
        the start order, and its compile would break the graphs the first one is running
        meanwhile (seen on two H200s)."""
        serving = [self.engines[n] for n in self._serving] + [r for r in self.remotes if r.ready.is_set()]
        self._encodes += 1
        return serving[self._encodes % len(serving)] if serving else self.engine

    def _compile_ahead(self, lane: int, model) -> None:
        """The replica's compile warm-up, while its text encoder is still to load (`model_loader`)."""
        self.engines[lane].compile_ahead(model)

    @staticmethod
    def _freeze_compiled() -> None:
        """Replicas: from now on, a shape no graph covers runs eagerly instead of compiling,
        in the warm-ups too (jobs never compile: `compilation.serving`). Compiling traces with
        `torch.nn.Module.__call__` patched for the whole process, which breaks the modules
        other lanes are running meanwhile (seen on two H200s: "Detected that you are using FX
        to symbolically trace a dynamo-optimized function")."""
        torch.compiler.set_stance("eager_on_recompile")
        log.info("replicas ready: shapes not compiled by now run eagerly")

    def _warm_up_while_idle(self, lane: int) -> bool:
        """The LoRA slots' and batches' graphs, one per step, when no job waits; whether more remain."""
        model, engine = self.replicas[lane].get(), self.engines[lane]
        if not (model.compiled and engine.warming_up):  # replicas ran theirs at start: nothing to mark again
            return False
        more = compilation.compile_step(model, engine.warm_up_idle)
        if not more and model.compiled and lane == 0:
            startup_clock.mark("LoRA slots and batch sizes compiled")
            compile_cache.keep(self.settings)
        return more

    def close(self) -> None:
        """Take no new jobs; finish what is queued and running."""
        self.batcher.close()
        self.downloads.shutdown(wait=False)
        if self.followers is not None:
            self.followers.stop()
        for remote in self.remotes:
            remote.stop()

    def _check_text_fits(self, request: EditRequest, plan) -> None:
        try:
            self.holder.get()  # the count needs the model's processor
        except RuntimeError as error:  # the model failed to load: the batcher says the same
            raise WorkerBroken(str(error)) from None
        try:
            self.prompt_budget.check(request, plan.width, plan.height, plan.reference_sizes)
        except TextTooLong as error:
            raise schema.InputError(str(error)) from None

    def _run_batch(self, lane: int, requests: list[EditRequest]) -> list[EditResult]:
        engine = self.engines[lane]
        try:
            # A shape the warm-up did not cover that fails to compile is served (with all later ones) eagerly.
            return compilation.run_or_fall_back(self.replicas[lane].get(), lambda: self._run_on_ranks(engine, requests))
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise

    def _run_on_ranks(self, engine: EditEngine, requests: list[EditRequest]) -> list[EditResult]:
        """`engine.run_batch`; with GPU_PARALLELISM=context, a failure after a follower stopped is `RankLost`."""
        try:
            results = engine.run_batch(requests)
        except Exception as error:
            if self.followers is not None:
                self.followers.check_after(error)  # the failure is the stopped follower's (chained as its context)
            raise
        if self.followers is not None:
            # on NCCL the watch ended the group mid-batch: what the aborted collectives left is not an image
            self.followers.check()
        return results

    async def handle(self, job: dict) -> dict:
        started = time.perf_counter()
        loras: tuple[AppliedLora, ...] = ()
        try:
            params = schema.parse(job.get("input"), self.settings)
            pictures = await images.load_images_async(params.image_sources(), self.settings, self.downloads)
            loras = await self._loras(params)
            fetched = time.perf_counter()
            request = self.build_request(params, pictures, self._progress_reporter(job), loras)
            plan = self.engine.plan(request)
            outputs.check_fits(request.num_images, plan.width, plan.height, params.output_format, self.settings)
            await asyncio.to_thread(self._check_text_fits, request, plan)
            request = self._encoder().encode_ahead(request)
            result = await self.batcher.submit(request, size=request.num_images)
            finished = time.perf_counter()
            response = await asyncio.to_thread(self._respond, job, request, params, result)
            response["timings_ms"] = {"fetch": _ms(started, fetched), "queue_and_gpu": _ms(fetched, finished),
                                      **result.timings_ms, "total": _ms(started, time.perf_counter())}  # fmt: skip
            outputs.check_size(response, self.settings)
            return response
        except (schema.InputError, outputs.DeliveryError) as error:
            return {"error": str(error)}
        except WorkerBroken as error:
            # refresh_worker makes RunPod replace this worker once the job is answered.
            return {"error": f"This worker cannot run jobs ({error}); retry the job.", "refresh_worker": True}
        except BatcherClosed:
            return {"error": "This worker is shutting down; retry the job."}
        except Exception:  # the GPU side failed for this request alone: the log has the details
            log.exception("job %s failed", job.get("id"))
            return {"error": f"The edit failed inside the worker (logged with job id {job.get('id')}); retry the job."}
        finally:
            if loras:
                self.lora_store.release([lora.file for lora in loras])

    def _lora_entries(self, params: schema.EditInput) -> list[schema.LoraInput]:
        """The job's own `loras`, or the endpoint's (`LORAS`) when it sends none."""
        return params.loras if params.loras is not None else self.default_loras

    async def _loras(self, params: schema.EditInput) -> tuple[AppliedLora, ...]:
        entries = self._lora_entries(params)
        if not entries:
            return ()
        if self.settings.precision_mode == "fp8":
            raise schema.InputError(
                "Input field 'loras' cannot be used with PRECISION_MODE=fp8 on this endpoint: its float8 "
                "transformer does not take LoRA adapters; use an endpoint in bf16, 8bit or 4bit."
            )
        setting = params.loras is None  # the endpoint's own
        return _applied(await self.lora_store.resolve(entries, setting), entries, setting)

    def build_request(self, params: schema.EditInput, pictures: list, progress=None, loras=()) -> EditRequest:
        steps = params.num_inference_steps or self.settings.default_steps
        cfg = params.true_cfg_scale if params.true_cfg_scale is not None else self.settings.default_true_cfg_scale
        return EditRequest(
            prompt=params.prompt,
            images=tuple(pictures),
            seed=schema.resolve_seed(params),
            num_inference_steps=steps,
            true_cfg_scale=cfg,
            negative_prompt=params.negative_prompt,
            width=params.width,
            height=params.height,
            num_images=params.num_images,
            loras=tuple(loras),
            progress=progress,
        )

    def _progress_reporter(self, job: dict) -> Callable[[int, int], None] | None:
        if self._progress is None:
            return None

        def report(step: int, total: int) -> None:
            if step % PROGRESS_EVERY_STEPS == 0 or step == total:
                try:
                    self._progress(job, {"step": step, "total_steps": total, "percent": round(100 * step / total)})
                except Exception:  # progress is best effort; it must never fail a batch
                    log.warning("progress update for job %s failed", job.get("id"), exc_info=True)

        return report

    def _respond(self, job: dict, request: EditRequest, params: schema.EditInput, result: EditResult) -> dict:
        """Encode, save and deliver the images (CPU and network work, off the event loop)."""
        encoded = [images.encode_image(px, params.output_format, params.output_quality) for px in result.images]
        self._save_local_copies(job, encoded, params.output_format)
        model = self.holder.get()
        return {
            **outputs.deliver(_safe_name(str(job.get("id", "job"))), encoded, params.output_format, self.settings),
            "output_format": params.output_format,
            "seed": request.seed,
            "prompt": request.prompt,
            "num_inference_steps": request.num_inference_steps,
            "true_cfg_scale": request.true_cfg_scale,
            "lightning_enabled": model.lightning,
            "width": result.width,
            "height": result.height,
            "precision": model.precision,
            "batch_size": result.batch_size,
            "loras": [
                {"path": lora.path, **({"weight_name": lora.weight_name} if lora.weight_name else {}),
                 "scale": lora.scale, "sha256": applied.file.sha256}
                for lora, applied in zip(self._lora_entries(params), request.loras)
            ],  # fmt: skip
            "warnings": job_warnings(params, request, self.settings, (result.width, result.height)),
        }

    def _save_local_copies(self, job: dict, encoded: list[bytes], output_format: str) -> None:
        if not self.settings.save_output_dir:
            return
        folder = Path(self.settings.save_output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for k, data in enumerate(encoded):
            path = folder / f"{_safe_name(str(job.get('id', 'job')))}-{k}.{output_format}"
            path.write_bytes(data)
            log.info("saved output image %s", path)


def _applied(files: list, entries: list[schema.LoraInput], setting: bool = False) -> tuple[AppliedLora, ...]:
    return tuple(AppliedLora(file, entry.scale, i, setting) for i, (file, entry) in enumerate(zip(files, entries)))


def job_warnings(params: schema.EditInput, request: EditRequest, settings: Settings, size: tuple[int, int]) -> list[str]:
    """What ran other than the client may expect: settings that the model as configured
    ignores or runs off its design, an output size other than asked. Empty when nothing
    needs saying."""
    notes = [note] if (note := _derived_side_note(request, size)) else []
    if settings.use_lightning_lora and params.num_inference_steps not in (None, settings.lightning_steps):
        notes.append(
            f"num_inference_steps {request.num_inference_steps} ran the Lightning LoRA, which is distilled for "
            f"{settings.lightning_steps} steps: other step counts run it off the schedule it learned (the 40-step base "
            "model needs USE_LIGHTNING_LORA=false on the endpoint)."
        )
    if settings.use_lightning_lora and request.do_cfg:
        notes.append(
            f"true_cfg_scale {request.true_cfg_scale:g} ran classifier-free guidance on the Lightning LoRA, which is "
            "distilled without it: each step costs twice as much and images may over-saturate (use 1)."
        )
    if params.true_cfg_scale is not None and params.true_cfg_scale < 1:
        notes.append(
            f"true_cfg_scale {params.true_cfg_scale:g} is below 1, which turns guidance off: it ran as 1 would."
        )
    if params.negative_prompt is not None and not request.do_cfg:
        notes.append("negative_prompt was not used: it takes effect only when true_cfg_scale is above 1.")
    for lora in request.loras:
        if lora.file.text_encoder_skipped:
            notes.append(f"{'LORAS' if lora.setting else 'loras'}[{lora.index}] also holds text-encoder weights, which were not applied: this worker "
                         "applies LoRAs to the transformer only.")  # fmt: skip
    return notes


def _derived_side_note(request: EditRequest, size: tuple[int, int]) -> str | None:
    """One side given: the other follows the last image's aspect ratio, unless the side
    limits moved it (a 64x512 input with width 512 would need a height of 4096)."""
    wanted = aspect_side(request)
    if wanted is None:
        return None
    width, height = size
    if request.height is None:
        side, given, got = "height", f"width {request.width}", height
    else:
        side, given, got = "width", f"height {request.height}", width
    if abs(wanted - got) <= 16:  # sides are multiples of 16
        return None
    image_width, image_height = request.images[-1].size
    return (
        f"{side} follows the last input image's aspect ratio ({image_width}x{image_height}), which with {given} would be "
        f"{round(wanted)} px, outside the {MIN_DERIVED_SIDE}-{MAX_DERIVED_SIDE} px a side may have: the output is "
        f"{width}x{height}, another aspect ratio (give both width and height to choose it)."
    )


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:80] or "job"


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 1)

