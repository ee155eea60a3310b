"""Does the host ever wait for the GPU while a batch denoises? (CUDA only.)

    python3 benchmarks/check_no_sync.py /tmp/models

Loads the tiny model on the GPU through the production loader and runs, through the engine,
a job alone and a batch of two jobs whose prompts differ in length (padded text and a
mask) with CFG on and progress callbacks, with `torch.cuda.set_sync_debug_mode("warn")`
around `EditEngine._denoise`. Every synchronising CUDA call (a device-to-host copy,
`.item()`, a stream sync) is reported with the lines that made it.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from model_loader import ModelHolder  # noqa: E402
from qwen_edit_worker.engine.edit_engine import EditEngine, EditRequest  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    settings = Settings.from_env({"MODEL_ID": "tiny-random", "MODEL_DIR": sys.argv[1], "USE_LIGHTNING_LORA": "false"})
    holder = ModelHolder(settings)
    print(f"model on {holder.get().device}, compiled={holder.get().compiled}", flush=True)
    engine = EditEngine(settings, holder.get)

    syncs: list[tuple[str, list[str]]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                  if "warnings" not in f.filename]  # fmt: skip
        syncs.append((str(message)[:100], frames[-6:]))

    denoise = engine._denoise

    def watched(*args, **kwargs):
        torch.cuda.synchronize()  # work queued before the loop is not the loop's
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return denoise(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    engine._denoise = watched
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    steps: list[int] = []

    def edit(prompt: str, seed: int) -> EditRequest:
        return EditRequest(prompt=prompt, images=(image,), seed=seed, num_inference_steps=4, true_cfg_scale=4.0,
                           negative_prompt="blurry", width=128, height=96, progress=lambda i, n: steps.append(i))  # fmt: skip

    for name, batch in [("alone", [edit("add a hat", 0)]),
                        ("padded batch of two", [edit("add a hat", 1), edit("make the sky a deep orange sunset with birds", 2)])]:  # fmt: skip
        syncs.clear()
        results = engine.run_batch(batch)
        assert all(np.isfinite(r.images[0]).all() for r in results)
        print(f"{name}: {len(steps)} progress calls, {len(syncs)} synchronising CUDA calls in the denoising loop", flush=True)
        for message, frames in syncs:
            print(f"  {message}\n    " + "\n    ".join(frames))
        steps.clear()


if __name__ == "__main__":
    main()
