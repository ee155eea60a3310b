"""A worker without a usable GPU stops with the cause instead of loading 20B parameters on a CPU."""

from __future__ import annotations

import pytest
import torch

from config import Settings
from model_loader import ModelHolder, load_model
from qwen_edit_worker.engine.devices import DeviceError, missing_cuda_reason

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("env, sentence", [
    ({"PRECISION_MODE": "fp8"}, "PRECISION_MODE=fp8 needs a GPU with float8 units (Ada or Hopper, e.g. L40S, H100) "
                                "and this worker has no CUDA GPU; use bf16."),
    ({"MODEL_ID": "Qwen/Qwen-Image-Edit-2509"}, "No CUDA GPU is visible to this worker"),
])  # fmt: skip
def test_a_worker_that_cannot_run_its_precision_or_model_takes_no_job_and_exits_with_a_sentence(tiny_env, tmp_path,
                                                                                              env, sentence):
    """Started as RunPod starts it, with jobs queued: before, it took them, failed each with
    "retry" and `refresh_worker` when the model load found no GPU, and RunPod replaced it with a
    worker that did the same."""
    from tests.runpod_standin import RunPodStandIn
    from tests.test_runpod_worker import good_job, start_worker

    standin = RunPodStandIn()
    standin.add_jobs([good_job(0), good_job(1)])
    log_path = tmp_path / "worker.log"
    try:
        proc = start_worker(standin, tiny_env, log_path, **env)
        try:
            code = proc.wait(timeout=120)  # imports only: about 10 s; generous for a loaded machine
        finally:
            proc.kill()
    finally:
        standin.close()
    output = log_path.read_text()
    assert code == 1, output[-3000:]
    assert f"qwen-edit-worker: invalid configuration: {sentence}" in output
    assert "Traceback" not in output and standin.taken == []
