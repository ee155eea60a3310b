"""A worker without a usable GPU stops with the cause instead of loading 20B parameters on a CPU."""

from __future__ import annotations

import pytest
import torch

from config import Settings
from devices import DeviceError, missing_cuda_reason
from model_loader import ModelHolder, load_model

OLD_DRIVER = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
TORCH_WARNING = (
    "CUDA initialization: The NVIDIA driver on your system is too old (found version 12020). Please update "
    "your GPU driver by downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_the_real_model_without_a_gpu_fails_at_once_naming_the_cause(tmp_path, monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("the worker must not look for weights it cannot run")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path)})
    with pytest.raises(DeviceError) as failure:
        load_model(settings)
    message = str(failure.value)
    assert message.startswith("No CUDA GPU is visible to this worker (no NVIDIA driver is loaded)")
    assert f"CUDA {torch.version.cuda}" in message and "MODEL_ID=tiny-random" in message
    assert message.count(". ") <= 1 and "Traceback" not in message
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or built
    holder = ModelHolder(settings)
    with pytest.raises(RuntimeError, match="No CUDA GPU is visible"):
        holder.get()


def test_an_old_driver_is_named_with_the_version_this_torch_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    version_file = tmp_path / "version"
    version_file.write_text(OLD_DRIVER)
    message = missing_cuda_reason([TORCH_WARNING], version_file)
    assert message.startswith("No CUDA GPU can be used: NVIDIA driver 535.104.05 is loaded but CUDA does not start")
    assert "built for CUDA 13.0, which needs NVIDIA driver 580 or newer" in message
    assert "too old (found version 12020)" in message
    assert message.endswith("(on RunPod, allow only CUDA 13.0 hosts).")


def test_the_tiny_model_still_runs_on_a_cpu(base_holder):
    assert base_holder.get().device.type in ("cpu", "cuda")
