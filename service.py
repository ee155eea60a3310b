"""One job, end to end: validate, fetch images, batch onto the GPU, encode the answer.

`handler.py` stays a thin RunPod entry point; this is what it calls. Every failure a
client can cause becomes `{"error": "<one sentence>"}`; the worker keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

import images
import schema
from batching import Batcher
from config import Settings
from engine import EditEngine, EditRequest, EditResult
from model_loader import ModelHolder

log = logging.getLogger("qwen_edit_worker.service")

ProgressSink = Callable[[dict, dict], None]  # (job, progress payload)
PROGRESS_EVERY_STEPS = 2


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


class EditService:
    def __init__(self, settings: Settings, progress: ProgressSink | None = None, holder: ModelHolder | None = None):
        self.settings = settings
        self.holder = holder or ModelHolder(settings)
        self.engine = EditEngine(settings, self.holder.get)
        self._progress = progress
        self.batcher: Batcher[EditRequest, EditResult] = Batcher(
            run_batch=self._run_batch,
            key=self.engine.batch_key,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.batch_wait_ms / 1000,
            is_out_of_memory=_is_out_of_memory,
            on_start=self.holder.get,  # load the model as the worker starts, not on the first job
        )

    def close(self) -> None:
        """Take no new jobs; finish what is queued and running."""
        self.batcher.close()

    def _run_batch(self, requests: list[EditRequest]) -> list[EditResult]:
        try:
            return self.engine.run_batch(requests)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise

    async def handle(self, job: dict) -> dict:
        started = time.perf_counter()
        job_input = job.get("input")
        try:
            params = schema.parse(job_input, self.settings)
            pictures = await asyncio.to_thread(images.load_images, params.image_sources(), self.settings)
        except schema.InputError as error:
            return {"error": str(error)}
        fetched = time.perf_counter()
        request = self.build_request(params, pictures, self._progress_reporter(job))
        try:
            result = await self.batcher.submit(request, size=request.num_images)
        except schema.InputError as error:
            return {"error": str(error)}
        except Exception as error:  # the GPU side failed for this request alone
            log.exception("job %s failed", job.get("id"))
            return {"error": f"The edit failed: {type(error).__name__}: {error}"}
        finished = time.perf_counter()
        encoded = await asyncio.to_thread(self._encode, result, params)
        self._save_local_copies(job, encoded, params.output_format)
        timings = {"fetch": _ms(started, fetched), "queue_and_gpu": _ms(fetched, finished), **result.timings_ms}
        timings["total"] = _ms(started, time.perf_counter())
        return self._response(request, params, result, encoded, timings)

    def build_request(self, params: schema.EditInput, pictures: list, progress=None) -> EditRequest:
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
            progress=progress,
        )

    def _progress_reporter(self, job: dict) -> Callable[[int, int], None] | None:
        if self._progress is None:
            return None

        def report(step: int, total: int) -> None:
            if step % PROGRESS_EVERY_STEPS == 0 or step == total:
                self._progress(job, {"step": step, "total_steps": total, "percent": round(100 * step / total)})

        return report

    def _encode(self, result: EditResult, params: schema.EditInput) -> list[bytes]:
        return [images.encode_image(px, params.output_format, params.output_quality) for px in result.images]

    def _save_local_copies(self, job: dict, encoded: list[bytes], output_format: str) -> None:
        if not self.settings.save_output_dir:
            return
        folder = Path(self.settings.save_output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for k, data in enumerate(encoded):
            path = folder / f"{_safe_name(str(job.get('id', 'job')))}-{k}.{output_format}"
            path.write_bytes(data)
            log.info("saved output image %s", path)

    def _response(self, request: EditRequest, params, result: EditResult, encoded: list[bytes], timings) -> dict:
        model = self.holder.get()
        as_base64 = [images.to_base64(data) for data in encoded]
        return {
            "output_image_base64": as_base64[0],
            "images": as_base64,
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
            "timings_ms": timings,
        }


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:80] or "job"


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 1)

