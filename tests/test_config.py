"""Settings: defaults, every bad value named, and the worker refusing to start on one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, Settings, default_lightning_weight, export_library_settings, variable_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_the_image(tmp_path, monkeypatch):
    """The image's `/models` folder (the Dockerfile makes it), here under tmp_path."""
    import config

    monkeypatch.setattr(config, "CONTAINER_MODELS", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def test_defaults_are_the_documented_ones(in_the_image):
    s = Settings.from_env({}, runpod_volume="/nonexistent")
    assert s.model_id == "Qwen/Qwen-Image-Edit-2509"
    assert s.model_dir == str(in_the_image / "qwen_image_edit_2509")
    assert (s.precision_mode, s.use_lightning_lora, s.lightning_steps) == ("bf16", True, 8)
    assert s.lightning_repo == "lightx2v/Qwen-Image-Lightning"
    assert s.lightning_weight_name == "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
    assert (s.cpu_offload, s.attention_backend, s.vae_tiling, s.vae_slicing) == ("auto", "auto", False, False)
    assert (s.max_batch_size, s.max_concurrency, s.batch_wait_ms) == (4, 8, 50)
    assert (s.max_input_images, s.allow_private_image_urls) == (3, False)
    assert s.reference_image_area == 1024 * 1024
    assert (s.default_steps, s.default_true_cfg_scale) == (8, 1.0)
    assert (s.gpu_parallelism, s.gpu_count, s.replica_processes) == ("auto", 0, True)


def test_model_dir_defaults_to_the_network_volume_when_one_is_mounted(tmp_path, in_the_image):
    # /proc is a mount point on every Linux machine: it stands for a mounted /runpod-volume.
    assert Settings.from_env({}, runpod_volume="/proc").model_dir == "/proc/qwen-edit-worker"
    # A plain directory (RunPod's model cache alone creates /runpod-volume/huggingface-cache) is no volume.
    assert Settings.from_env({}, runpod_volume=str(tmp_path)).model_dir == str(in_the_image / "qwen_image_edit_2509")
    assert Settings.from_env({"MODEL_DIR": "/data/m"}, runpod_volume="/proc").model_dir == "/data/m"


def test_a_local_run_outside_the_image_keeps_the_model_in_the_users_cache_folder(tmp_path, monkeypatch):
    """Not in a new folder under `/`: created silently as root, refused to anyone else."""
    import config

    monkeypatch.setattr(config, "CONTAINER_MODELS", str(tmp_path / "no-such-folder"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings.from_env({}, runpod_volume="/nonexistent").model_dir == str(tmp_path / "home/.cache/qwen-edit-worker")


def test_model_id_must_be_a_folder_or_a_hub_repo_id(tmp_path):
    with pytest.raises(ConfigError, match=r"^MODEL_ID must be a Hugging Face repo id \(owner/name\) or an existing folder"):
        Settings.from_env({"MODEL_ID": str(tmp_path / "no/such/model")})
    assert Settings.from_env({"MODEL_ID": str(tmp_path)}).model_id == str(tmp_path)
    assert Settings.from_env({"MODEL_ID": "someone/their-edit-model"}).model_id == "someone/their-edit-model"


def test_lightning_steps_choose_the_weight_file_and_defaults():
    s = Settings.from_env({"LIGHTNING_STEPS": "4"})
    assert s.lightning_weight_name == default_lightning_weight(4)
    assert "4steps" in s.lightning_weight_name and s.default_steps == 4
    off = Settings.from_env({"USE_LIGHTNING_LORA": "false"})
    assert (off.default_steps, off.default_true_cfg_scale) == (40, 4.0)


def test_max_concurrency_defaults_to_two_batches_and_can_be_set():
    assert Settings.from_env({"MAX_BATCH_SIZE": "3"}).max_concurrency == 6
    assert Settings.from_env({"MAX_BATCH_SIZE": "3", "MAX_CONCURRENCY": "5"}).max_concurrency == 5


def test_values_are_parsed_and_normalised():
    s = Settings.from_env({"PRECISION_MODE": "4BIT", "VAE_TILING": "yes", "CPU_OFFLOAD": " model ", "ATTENTION_BACKEND": "flash"})
    assert (s.precision_mode, s.vae_tiling, s.cpu_offload, s.attention_backend) == ("4bit", True, "model", "flash")


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("PRECISION_MODE", "bogus", "bf16, 8bit, 4bit, fp8"),
        ("CPU_OFFLOAD", "always", "none, model, sequential, auto"),
        ("LIGHTNING_STEPS", "6", "4, 8"),
        ("USE_LIGHTNING_LORA", "maybe", "true or false"),
        ("MAX_BATCH_SIZE", "0", "from 1 to 64"),
        ("BATCH_WAIT_MS", "soon", "whole number"),
        ("IMAGE_DOWNLOAD_TIMEOUT_S", "-1", "number from"),
        ("ATTENTION_BACKEND", "warp-drive", "native"),
        ("MAX_INPUT_IMAGES", "100", "from 1 to 16"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_allows(name, value, allowed):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert message.startswith(name) and allowed in message and repr(value) in message


def test_tiny_model_uses_a_small_reference_area():
    assert Settings.from_env({"MODEL_ID": "tiny-random"}).reference_image_area == 64 * 64
    assert Settings.from_env({"MODEL_ID": "tiny-random", "REFERENCE_IMAGE_AREA": "16384"}).reference_image_area == 16384


def test_variable_names_lists_every_read():
    names = variable_names()
    assert {"MODEL_ID", "PRECISION_MODE", "MAX_CONCURRENCY", "ALLOW_PRIVATE_IMAGE_URLS"} <= set(names)
    assert len(names) == len(set(names))


def test_compile_cache_goes_to_the_model_volume_even_after_torch_filled_in_its_default(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache_dir()  # what importing diffusers does: torch writes its /tmp default into the environment
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] != str(tmp_path / "torchinductor")
    export_library_settings(Settings.from_env({"MODEL_DIR": str(tmp_path)}))
    assert cache_dir() == str(tmp_path / "torchinductor")  # where inductor now writes
    assert (tmp_path / "torchinductor").is_dir()


def test_a_compile_cache_directory_the_user_chose_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    export_library_settings(Settings.from_env({"MODEL_DIR": str(tmp_path / "volume")}))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_only_config_reads_the_environment():
    offenders = [
        path.name
        for path in [*ROOT.glob("*.py"), *(ROOT / "qwen_edit_worker").rglob("*.py")]
        if path.name != "config.py" and ("os.environ" in path.read_text() or "getenv" in path.read_text())
    ]
    assert offenders == []


def test_worker_refuses_to_start_with_a_bad_precision_mode():
    env = {**os.environ, "PRECISION_MODE": "bogus", "MODEL_ID": "tiny-random"}
    done = subprocess.run(
        [sys.executable, "handler.py", "--test_input", '{"input": {"prompt": "x"}}'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "PRECISION_MODE" in done.stderr and "bogus" in done.stderr
    assert "Starting Serverless Worker" not in done.stdout
