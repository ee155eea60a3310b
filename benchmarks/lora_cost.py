"""What per-request LoRAs cost at real size on one GPU, measured in one run.

    python3 benchmarks/lora_cost.py --out $OUT [--skip-quantized]

Real-size Qwen-Image-Edit-2509 with random weights (`gpu_speed.build_pipeline`), bf16,
1024² output from a 1024² input, 8 Lightning steps, one job at a time through the
worker's `EditService`. Three rank-64 Lightning-format LoRAs covering the transformer's 720
linear layers are served from a loopback HTTP server. The model is prepared as a compiled
worker's is (`--slots` hot-swappable LoRA slots of rank 64, then regional compilation, then
the start-up warm-up with 0 to `--slots` slots active) and goes through: base jobs; the first
LoRA job (download, convert, swap); repeats; a switch to another LoRA; back to a cached one;
three LoRAs at once; two; one again; base jobs again. Each row is one job: wall time, denoise time, and the graphs
dynamo compiled during it (a recompilation shows as 1).
With `--skip-quantized` off, it then runs one LoRA job on the tiny model in 4-bit (PEFT on
bitsandbytes layers) to show that path works.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_speed import Preloaded  # noqa: E402
from real_size import build_pipeline, input_png  # noqa: E402

from config import Settings  # noqa: E402
from model_loader import LoadedModel  # noqa: E402
from qwen_edit_worker.engine import fp8  # noqa: E402
from qwen_edit_worker.loras.adapters import prepare_slots  # noqa: E402
from qwen_edit_worker.service import EditService  # noqa: E402
from qwen_edit_worker.testing.tiny_model import lightning_format_lora  # noqa: E402


def rank64(transformer, seed: int, rank: int = 64) -> dict[str, torch.Tensor]:
    """A real-size Lightning-format LoRA: rank 64 and alpha 8 as the Lightning files have."""
    return lightning_format_lora(transformer, rank=rank, alpha=8.0, seed=seed, std=0.01)


def serve(folder: str) -> int:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd.server_address[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--skip-quantized", action="store_true")
    parser.add_argument("--slots", type=int, default=3, help="MAX_LORAS: hot-swappable slots")
    parser.add_argument("--fp8", action="store_true", help="PRECISION_MODE=fp8 (torchao) before the slots")
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    pipe = build_pipeline()
    start = time.perf_counter()
    for k in range(3):
        save_file(rank64(pipe.transformer, k), f"{folder}/lora{k}.safetensors")
    print(f"wrote three rank-64 LoRAs in {time.perf_counter() - start:.0f} s", flush=True)
    port = serve(folder)
    url = lambda k: f"http://127.0.0.1:{port}/lora{k}.safetensors"  # noqa: E731
    settings = Settings.from_env({"MODEL_ID": "real-size-random", "MODEL_DIR": tempfile.mkdtemp(), "MAX_LORAS": str(args.slots),
                                  "ALLOW_PRIVATE_IMAGE_URLS": "true", "MAX_BATCH_SIZE": "1"})  # fmt: skip
    if args.fp8:
        fp8.quantize(pipe.transformer)
    start = time.perf_counter()
    slots = prepare_slots(pipe, args.slots, settings.max_lora_rank)
    print(f"prepared {args.slots} slots in {time.perf_counter() - start:.1f} s", flush=True)
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    model = LoadedModel(pipe, torch.device("cuda"), torch.bfloat16, "fp8" if args.fp8 else "bf16", True, "none", compiled=True,
                        lora_slots=slots, lora_slot_count=len(slots), lora_rank=settings.max_lora_rank)  # fmt: skip
    image = input_png(1024, 0)
    plan = [("base, waiting for the start-up warm-up", []), ("base", []), ("base", []),
            ("first LoRA: download, convert, swap", [0]), ("same LoRA", [0]), ("same LoRA", [0]),
            ("another LoRA: download, convert, swap", [1]), ("back to the first (cached)", [0]),
            ("three LoRAs (one new)", [0, 1, 2]), ("three LoRAs", [0, 1, 2]), ("two LoRAs", [0, 1]),
            ("one LoRA again", [1]), ("base", []),
            ("base", [])]  # fmt: skip
    rows = []

    async def scenario():
        service = EditService(settings, holder=Preloaded(model))
        try:
            for n, (label, loras) in enumerate([(label, loras) for label, loras in plan if len(loras) <= args.slots]):
                job = {"id": f"j{n}", "input": {"prompt": "Add a red hat to the person on the left", "image_base64": image,
                       "width": 1024, "height": 1024, "seed": 1, "loras": [{"path": url(k)} for k in loras]}}  # fmt: skip
                torch.cuda.synchronize()
                graphs = counters["stats"]["unique_graphs"]
                start = time.perf_counter()
                answer = await service.handle(job)
                seconds = time.perf_counter() - start
                if "error" in answer:
                    raise SystemExit(f"{label}: {answer['error']}")
                rows.append({"job": label, "loras": len(loras), "wall_s": round(seconds, 2),
                             "denoise_s": round(answer["timings_ms"]["denoise"] / 1000, 2),
                             "graphs": counters["stats"]["unique_graphs"] - graphs})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
            print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, 1024² Lightning-8, {'fp8' if args.fp8 else 'bf16'}, {args.slots} slots\n")
            print("| job | LoRAs | wall s | denoise s | graphs compiled |\n| --- | --- | --- | --- | --- |")
            for row in rows:
                print(f"| {row['job']} | {row['loras']} | {row['wall_s']} | {row['denoise_s']} | {row['graphs']} |", flush=True)
        finally:
            service.close()

    asyncio.run(scenario())
    Path(args.out, "lora_cost.json").write_text(json.dumps(rows, indent=1))
    del pipe, model
    torch.cuda.empty_cache()
    if not args.skip_quantized:
        check_quantized(url(0))


def check_quantized(lora_url: str) -> None:
    """One LoRA job on the tiny model in 4-bit: PEFT layers over bitsandbytes, Lightning kept active."""
    import model_loader
    from qwen_edit_worker.testing.tiny_model import ensure_tiny_model

    folder = tempfile.mkdtemp()
    settings = Settings.from_env({"MODEL_ID": "tiny-random", "MODEL_DIR": folder, "PRECISION_MODE": "4bit",
                                  "ALLOW_PRIVATE_IMAGE_URLS": "true"})  # fmt: skip
    holder = model_loader.ModelHolder(settings)
    model = holder.get()
    port = serve(str(ensure_tiny_model(folder)))  # its Lightning-format file serves as a user LoRA

    async def scenario():
        service = EditService(settings, holder=holder)
        try:
            job = {"id": "q", "input": {"prompt": "x", "image_base64": input_png(64, 1), "width": 64, "height": 64,
                   "loras": [{"path": f"http://127.0.0.1:{port}/lightning-lora.safetensors", "scale": 0.8}]}}  # fmt: skip
            return await service.handle(job)
        finally:
            service.close()

    answer = asyncio.run(scenario())
    active = model.pipe.transformer.active_adapters() if hasattr(model.pipe.transformer, "active_adapters") else "?"
    print(json.dumps({"4bit LoRA job": "error" not in answer, "error": answer.get("error"), "active_adapters": active}))


if __name__ == "__main__":
    main()
