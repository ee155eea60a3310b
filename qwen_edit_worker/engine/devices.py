"""Which device and dtype the worker computes on, and what the chosen precision needs.

The real model is 20B parameters: on a CPU it would load for minutes in float32 and then
take hours per image. So a worker without a usable CUDA GPU stops at once with the cause
(no GPU visible, or a driver too old for this torch build), unless it runs the tiny model.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch

from config import Settings

log = logging.getLogger("qwen_edit_worker.devices")

FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper have float8 matrix units
# The oldest Linux driver each CUDA major version runs on (NVIDIA's compatibility table).
MIN_DRIVER_FOR_CUDA = {12: 525, 13: 580}
NVIDIA_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


class DeviceError(RuntimeError):
    """The machine cannot run the configured model; the message says why, in one sentence."""


def breaks_the_gpu(error: BaseException) -> bool:
    """A CUDA error (not out-of-memory) poisons the CUDA context for the whole process."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, torch.AcceleratorError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)


def resolve_device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """bf16 where the GPU supports it, fp16 where it does not; fp32 on CPU (tiny model only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        if not settings.is_tiny:
            raise DeviceError(missing_cuda_reason([str(w.message) for w in caught]))
        log.info("no CUDA device: running the tiny model on CPU in float32")
        return torch.device("cpu"), torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.device("cuda"), torch.bfloat16
    log.warning("GPU %s has no bfloat16 support: switching to float16", torch.cuda.get_device_name())
    return torch.device("cuda"), torch.float16


def missing_cuda_reason(cuda_warnings: list[str], version_file: Path = NVIDIA_DRIVER_VERSION_FILE) -> str:
    """One sentence: why torch sees no CUDA GPU here, and what to do."""
    build = torch.version.cuda
    if build is None:
        return "No CUDA GPU can be used: this torch build has no CUDA support; install the CUDA build from requirements.txt."
    needed = MIN_DRIVER_FOR_CUDA.get(int(build.split(".")[0]))
    needs = f"torch here is built for CUDA {build}" + (f", which needs NVIDIA driver {needed} or newer" if needed else "")
    driver = nvidia_driver_version(version_file)
    if driver is None:
        return (
            f"No CUDA GPU is visible to this worker (no NVIDIA driver is loaded); the model needs one ({needs}). "
            "Set MODEL_ID=tiny-random to try the worker on a CPU."
        )
    detail = next((w.split("CUDA initialization: ", 1)[-1].strip() for w in cuda_warnings if "CUDA" in w), "")
    return (
        f"No CUDA GPU can be used: NVIDIA driver {driver} is loaded but CUDA does not start ({needs})"
        + (f": {detail.rstrip('.')}" if detail else "")
        + "; run on a host with a newer driver (on RunPod, allow only CUDA 13.0 hosts)."
    )


def nvidia_driver_version(version_file: Path = NVIDIA_DRIVER_VERSION_FILE) -> str | None:
    """The loaded kernel driver's version, as /proc reports it, or None without a driver."""
    try:
        text = version_file.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \w+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else "of unknown version"


def check_precision_supported(settings: Settings, device: torch.device) -> None:
    mode = settings.precision_mode
    if settings.uses_bitsandbytes and device.type != "cuda":
        raise DeviceError(f"PRECISION_MODE={mode} needs a CUDA GPU (bitsandbytes) and this worker has none; use bf16 here.")
    if mode == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY):
        gpu = "this worker has no CUDA GPU" if device.type != "cuda" else f"{torch.cuda.get_device_name(device)} has none"
        raise DeviceError(f"PRECISION_MODE=fp8 needs a GPU with float8 units (Ada or Hopper, e.g. L40S, H100) and {gpu}; use bf16.")
