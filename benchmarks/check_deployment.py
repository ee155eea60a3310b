"""What a real deployment does that CI (CPU, float32, tiny model) cannot show, checked on a GPU.

    python3 benchmarks/check_deployment.py --model-dir /tmp/models [--real-size-lora]

1. bf16 on the GPU with `COMPILE_TRANSFORMER=auto`: the start-up compiles (triton, with a C
   compiler on PATH) and warms up; a CFG job (true_cfg_scale 3.7, guidance in float32) and two
   jobs with prompts of different lengths (padded text, masked attention) are answered.
2. The same worker with no C compiler on PATH and an empty compile cache (a subprocess of
   itself): triton cannot build its launcher, the worker warns once and serves eagerly.
3. The 8-bit retry with fp32 CPU offload (a GPU budget too small for the transformer): the
   text encoder is LLM.int8 too.
4. With `--real-size-lora`: a Lightning-format LoRA made for the real-size transformer
   (random weights) reaches its 720 linear layers, and the count is what the loader logs.
Each check prints PASS or FAIL with what it saw; the exit code is the number of failures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model_loader  # noqa: E402
from config import Settings  # noqa: E402
from qwen_edit_worker.jobs import (
    images,  # noqa: E402
    schema,  # noqa: E402
)
from qwen_edit_worker.service import EditService  # noqa: E402

FAILURES: list[str] = []


def check(name: str, ok: bool, seen: object) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {seen}", flush=True)
    if not ok:
        FAILURES.append(name)


def png_b64(side: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def serve(env: dict[str, str], jobs: list[dict]) -> tuple[list[dict], EditService, float]:
    """Start a service as the worker does (load, compile, warm up) and answer `jobs` at once."""
    settings = Settings.from_env(env)

    async def scenario():
        service = EditService(settings)
        try:
            return await asyncio.gather(*(service.handle(job) for job in jobs)), service
        finally:
            service.close()

    start = time.perf_counter()
    answers, service = asyncio.run(scenario())
    return answers, service, time.perf_counter() - start


def jobs() -> list[dict]:
    image = png_b64(64, 1)
    common = {"images": [image], "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}
    return [
        {"id": "cfg", "input": {"prompt": "make the sky blue", "true_cfg_scale": 3.7, "negative_prompt": "blurry", **common}},
        {"id": "short", "input": {"prompt": "snow", **common}},
        {"id": "long", "input": {"prompt": "turn the whole scene into a watercolor painting at dusk", **common}},
    ]


def request_for(service: EditService, job: dict):
    params = schema.parse(job["input"], service.settings)
    return service.build_request(params, images.load_images(params.image_sources(), service.settings))


def check_compiled(model_dir: str) -> None:
    env = {"MODEL_ID": "tiny-random", "MODEL_DIR": model_dir, "USE_LIGHTNING_LORA": "false"}
    answers, service, seconds = serve(env, jobs())
    compiled = service.holder.get().compiled
    errors = [a.get("error") for a in answers if "error" in a]
    # The batcher runs a key's first jobs alone; a padded, masked batch of two is run directly.
    masked = service.engine.run_batch([request_for(service, job) for job in jobs()[1:]])
    finite = all(np.isfinite(image).all() for result in masked for image in result.images)
    check("bf16 GPU worker compiles at start and answers CFG and mixed-length jobs", compiled and not errors and finite,
          {"compiled": compiled, "errors": errors, "masked_batch_of_2_finite": finite,
           "precision": answers[0].get("precision"), "seconds": round(seconds, 1)})  # fmt: skip


def check_no_compiler(model_dir: str) -> None:
    with tempfile.TemporaryDirectory() as empty:
        env = {**os.environ, "PATH": empty, "TORCHINDUCTOR_CACHE_DIR": os.path.join(empty, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(empty, "triton"), "PYTHONUNBUFFERED": "1"}  # fmt: skip
        env.pop("CC", None)
        done = subprocess.run([sys.executable, __file__, "--model-dir", model_dir, "--only", "compiled"],
                              env=env, capture_output=True, text=True, timeout=500)  # fmt: skip
    log = done.stdout + done.stderr
    warnings = [line for line in log.splitlines() if "torch.compile failed" in line]
    # The child's own check fails (nothing compiled): what matters is that it served eagerly.
    served = "'compiled': False, 'errors': []" in log and "'masked_batch_of_2_finite': True" in log
    check("without a C compiler the worker warns once and serves eagerly", len(warnings) == 1 and served,
          {"warnings": [w[-300:] for w in warnings], "tail": log.strip().splitlines()[-1][-300:]})  # fmt: skip


def check_8bit_offload(model_dir: str) -> None:
    settings = Settings.from_env({"MODEL_ID": "tiny-random", "MODEL_DIR": model_dir, "PRECISION_MODE": "8bit"})
    path = model_loader.resolve_model_path(settings)
    pipe = model_loader._load_8bit_with_cpu_offload(settings, path, torch.bfloat16, gpu_budget=64 * 1024)
    kinds = {type(m).__name__ for m in pipe.text_encoder.modules() if "Linear" in type(m).__name__}
    check("8-bit offload retry quantizes the text encoder", "Linear8bitLt" in kinds, sorted(kinds))


def check_real_size_lora() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from safetensors.torch import save_file

    from qwen_edit_worker.loras.loading import load_lora
    from qwen_edit_worker.testing.tiny_model import lightning_format_lora

    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        transformer = QwenImageTransformer2DModel()  # Qwen-Image's real configuration, random weights
        torch.set_default_dtype(torch.float32)
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                     tokenizer=None, processor=None, transformer=transformer)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        lora = Path(folder) / "lightning-format.safetensors"
        save_file(lightning_format_lora(transformer), lora)
        with_log = io.StringIO()
        handler = logging.StreamHandler(with_log)
        logging.getLogger("qwen_edit_worker.loras").addHandler(handler)
        reached = load_lora(pipe, lora, "lightning")
    check("a Lightning-format LoRA reaches the real transformer's 720 linear layers", reached == 720,
          {"reached": reached, "logged": with_log.getvalue().strip()})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--only", default="compiled,no-compiler,8bit", help="checks to run, comma-separated")
    parser.add_argument("--real-size-lora", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qwen_edit_worker.loras").setLevel(logging.INFO)
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}), flush=True)
    chosen = args.only.split(",")
    if "compiled" in chosen:
        check_compiled(args.model_dir)
    if "no-compiler" in chosen:
        check_no_compiler(args.model_dir)
    if "8bit" in chosen:
        check_8bit_offload(args.model_dir)
    if args.real_size_lora:
        check_real_size_lora()
    sys.exit(len(FAILURES))


if __name__ == "__main__":
    main()
