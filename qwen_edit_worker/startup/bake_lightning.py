"""Build time only: put the Lightning LoRA into the image, so that no worker downloads it.

    python -m qwen_edit_worker.startup.bake_lightning 8   # or 4,8; run by the Dockerfile when
                                                          # built with ./build.sh IMAGE TAG --bake-lightning 8

RunPod's model cache holds one repository (the base model), so without this every new
worker downloads the Lightning file (850 MB) again unless a network volume keeps it. The
file goes into `IMAGE_HF_CACHE` in huggingface_hub's cache layout, where the loader looks
after MODEL_DIR and RunPod's cache.
"""

from __future__ import annotations

import sys

from huggingface_hub import hf_hub_download

from config import IMAGE_HF_CACHE, LIGHTNING_STEP_CHOICES, Settings, default_lightning_weight


def bake(steps: str) -> list[str]:
    choices = [int(step) for step in steps.split(",") if step.strip()]
    if not choices or any(step not in LIGHTNING_STEP_CHOICES for step in choices):
        raise SystemExit(f"--bake-lightning takes steps from {LIGHTNING_STEP_CHOICES}, comma-separated, not {steps!r}")
    return [hf_hub_download(Settings.lightning_repo, default_lightning_weight(step), cache_dir=IMAGE_HF_CACHE)
            for step in choices]  # fmt: skip


if __name__ == "__main__":
    for path in bake(sys.argv[1]):
        print(f"baked {path}")
