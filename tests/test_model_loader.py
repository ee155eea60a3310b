"""Loading the tiny model through the production paths: caches, Lightning, options."""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading
import time

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

import model_loader
from config import Settings
from model_loader import LIGHTNING_SCHEDULER_CONFIG, ModelHolder, load_model
from qwen_edit_worker.startup import model_files


def test_tiny_model_loads_through_from_pretrained(base_holder):
    model = base_holder.get()
    assert isinstance(model.pipe, QwenImageEditPlusPipeline)
    assert (model.device.type, model.dtype, model.precision, model.offload) == ("cpu", torch.float32, "fp32", "none")
    assert model.lightning is False
    assert type(model.pipe.transformer).__name__ == "QwenImageTransformer2DModel"
    assert type(model.pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_lightning_lora_is_loaded_fused_and_its_scheduler_used(tiny_env, base_holder):
    lightning = load_model(Settings.from_env(tiny_env(USE_LIGHTNING_LORA="true")))
    assert lightning.lightning is True
    assert isinstance(lightning.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    for name, value in LIGHTNING_SCHEDULER_CONFIG.items():
        assert lightning.pipe.scheduler.config[name] == value
    # Fused: no adapter remains, and the base weights have moved.
    assert lightning.pipe.get_list_adapters() == {}
    name = "transformer_blocks.0.attn.to_q.weight"
    fused = dict(lightning.pipe.transformer.named_parameters())[name]
    base = dict(base_holder.get().pipe.transformer.named_parameters())[name]
    assert not torch.equal(fused, base)


def test_holder_loads_once_for_concurrent_callers(tiny_settings, monkeypatch):
    calls = []
    real = model_loader.load_model

    def counting(settings, *placement):
        calls.append(1)
        return real(settings, *placement)

    monkeypatch.setattr(model_loader, "load_model", counting)
    holder = ModelHolder(tiny_settings)
    got = []
    threads = [threading.Thread(target=lambda: got.append(holder.get())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(m) for m in got}) == 1


def test_a_failed_load_is_remembered_and_reported(tmp_path):
    settings = Settings.from_env({"MODEL_ID": "tiny-random", "MODEL_DIR": str(tmp_path), "PRECISION_MODE": "4bit"})
    holder = ModelHolder(settings)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        holder.get()
    with pytest.raises(RuntimeError, match="the model failed to load: PRECISION_MODE=4bit needs a CUDA GPU"):
        holder.get()


def test_vae_options_and_offload_on_cpu(tiny_env):
    model = load_model(Settings.from_env(tiny_env(VAE_TILING="true", VAE_SLICING="true", CPU_OFFLOAD="model")))
    assert model.pipe.vae.use_tiling and model.pipe.vae.use_slicing
    assert model.offload == "none"  # there is no GPU to offload from


def test_weights_that_fit_are_read_straight_onto_the_device(base_holder):
    """Not read into CPU memory and copied: diffusers' device_map places each weight as it is read."""
    assert base_holder.get().pipe.hf_device_map == "cpu"  # the tiny model's device here


def test_the_text_encoder_is_read_onto_the_replicas_own_device(tiny_settings, base_holder, monkeypatch, caplog):
    """transformers takes the pipeline's device_map="cuda" as GPU 0, whatever the thread's
    current GPU: each replica names its own device (no GPU here: the request is what is checked).
    The start-up log says how long the read took (a slow disk stands in for 16.6 GB)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    asked, real = [], Qwen2_5_VLForConditionalGeneration.from_pretrained

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs.get("device_map"))
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", from_pretrained)
    with caplog.at_level("INFO", logger="qwen_edit_worker.model"):
        model = load_model(tiny_settings, torch.device("cpu"), replica=1)
    assert asked == [{"": torch.device("cpu")}]
    assert model.pipe.text_encoder.device == torch.device("cpu")
    took = re.search(r"reading the text encoder from \S+ onto cpu took (\d+\.\d+) s", caplog.text)
    assert took and float(took.group(1)) >= 0.5


def test_a_replicas_offload_uses_its_own_gpu():
    """diffusers offloads onto GPU 0 unless told which GPU: a replica on the second GPU names
    it (CPU_OFFLOAD=model on GPUs the weights do not fit). No GPU here: the hooks are set up
    and nothing runs."""
    from qwen_edit_worker.testing.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    model_loader._place(pipe, "model", torch.device("cuda", 1), quantized=False)
    assert pipe._offload_device == torch.device("cuda", 1)


def test_a_context_follower_loads_the_transformer_alone(tiny_settings, tiny_env, base_holder):
    """Rank 0 encodes every prompt and runs the VAE; a follower (rank > 0) runs only the
    transformer, so it does not spend GPU memory and load time on the text encoder (16.6 GB
    at real size) or the VAE (0.25 GB), whatever the VAE options."""
    from qwen_edit_worker.engine.context_parallel import Ranks

    follower = load_model(tiny_settings, ranks=Ranks(1, 2, None))  # loading forms no collective
    assert follower.pipe.text_encoder is None and follower.pipe.vae is None and follower.pipe.transformer is not None
    tiled = load_model(Settings.from_env(tiny_env(VAE_TILING="true")), ranks=Ranks(1, 2, None))
    assert tiled.pipe.vae is None
    assert base_holder.get().pipe.text_encoder is not None  # one process: the whole pipeline


def test_the_offload_decision_comes_from_the_file_headers_before_loading(tiny_settings, base_holder, monkeypatch):
    from qwen_edit_worker.testing.tiny_model import ensure_tiny_model

    path = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    planned = model_loader.planned_bytes(path, torch.bfloat16)
    pipe = base_holder.get().pipe  # float32 in memory: twice the bf16 bytes
    for name in model_loader.COMPONENTS:
        loaded = sum(p.numel() * p.element_size() for p in getattr(pipe, name).parameters())
        assert planned[name] == loaded // 2, name
    need, largest = sum(planned.values()), max(planned.values())
    gpu = torch.device("cuda")
    for free, expected in ((need * 2, "none"), (int(largest / 0.8) + 1024, "model"), (largest, "sequential")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda free=free: (free, free))
        assert model_loader.choose_offload(tiny_settings, planned, gpu) == expected, free


def _as_hub_cache(pipeline_dir, cache_root, repo_id: str, revision: str = "0" * 40):
    """Lay a saved pipeline out as huggingface_hub's cache does (models--org--name/snapshots/rev)."""
    repo_dir = cache_root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(pipeline_dir, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)


def test_weights_are_found_in_runpods_model_cache_without_downloading(tmp_path, tiny_settings, base_holder):
    from qwen_edit_worker.testing.tiny_model import ensure_tiny_model

    runpod_cache = tmp_path / "runpod-cache"
    _as_hub_cache(ensure_tiny_model(tiny_settings.model_dir) / "pipeline", runpod_cache, "acme/edit-model")
    settings = dataclasses.replace(
        Settings.from_env({"MODEL_ID": "acme/edit-model", "MODEL_DIR": str(tmp_path / "empty"), "USE_LIGHTNING_LORA": "false"}),
        hf_cache_dirs=(str(runpod_cache),),
    )
    path = model_loader.resolve_model_path(settings)
    assert path.startswith(str(runpod_cache))
    # (load_model itself refuses a non-tiny model without a GPU: see test_devices.py)
    assert isinstance(QwenImageEditPlusPipeline.from_pretrained(path), QwenImageEditPlusPipeline)


def test_a_pipeline_directory_is_used_as_it_is(tiny_settings):
    from qwen_edit_worker.testing.tiny_model import ensure_tiny_model

    directory = str(ensure_tiny_model(tiny_settings.model_dir) / "pipeline")
    assert model_loader.resolve_model_path(Settings.from_env({"MODEL_ID": directory})) == directory


def test_lora_is_found_in_model_dir_before_any_download(tmp_path, tiny_settings):
    from qwen_edit_worker.testing.tiny_model import ensure_tiny_model

    cache = tmp_path / "model-dir"
    repo_dir = cache / "models--acme--lightning"
    weight = "Qwen-Image-Edit-2509/lora-8steps.safetensors"
    target = repo_dir / "snapshots" / ("1" * 40) / weight
    target.parent.mkdir(parents=True)
    shutil.copy(ensure_tiny_model(tiny_settings.model_dir) / "lightning-lora.safetensors", target)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("1" * 40)
    settings = Settings.from_env(
        {"MODEL_DIR": str(cache), "LIGHTNING_REPO": "acme/lightning", "LIGHTNING_WEIGHT_NAME": weight}
    )
    assert model_loader.resolve_lora_path(settings) == str(target)
    assert model_files.local_lora_path(settings) == str(target)  # what the prefetch reads at process start
    absent = dataclasses.replace(settings, model_dir=str(tmp_path / "empty"), hf_cache_dirs=())
    assert model_files.local_lora_path(absent) is None  # not on disk: looked up, never downloaded


def test_fp8_needs_a_float8_gpu(tmp_path):
    settings = Settings.from_env({"MODEL_ID": "tiny-random", "MODEL_DIR": str(tmp_path), "PRECISION_MODE": "fp8"})
    with pytest.raises(RuntimeError, match="PRECISION_MODE=fp8 needs a GPU with float8 units"):
        load_model(settings)


def test_lightning_is_fused_at_alpha_over_rank_times_up_down_per_module(tiny_env, base_holder):
    from safetensors.torch import load_file

    from qwen_edit_worker.testing.tiny_model import TINY_LORA_ALPHA, TINY_LORA_RANK, ensure_tiny_model

    assert TINY_LORA_ALPHA / TINY_LORA_RANK != 1  # alpha = rank could not catch an ignored alpha
    state = load_file(ensure_tiny_model(tiny_env()["MODEL_DIR"]) / "lightning-lora.safetensors")
    fused = dict(load_model(Settings.from_env(tiny_env(USE_LIGHTNING_LORA="true"))).pipe.transformer.named_parameters())
    base = dict(base_holder.get().pipe.transformer.named_parameters())
    modules = [key[: -len(".lora_down.weight")] for key in state if key.endswith(".lora_down.weight")]
    assert len(modules) == 2 * 12  # 2 blocks x (q, k, v, out and MLP of each stream)
    for module in modules:
        down = state[f"{module}.lora_down.weight"].float()
        up = state[f"{module}.lora_up.weight"].float()
        alpha = state[f"{module}.alpha"].float()
        expected = alpha / down.shape[0] * up @ down
        change = fused[f"{module}.weight"] - base[f"{module}.weight"]
        assert torch.allclose(change, expected, atol=1e-6, rtol=1e-4), module


def test_a_lora_that_reaches_no_layer_is_refused(base_holder, tmp_path):
    from safetensors.torch import save_file

    from qwen_edit_worker.loras.loading import LoraError, load_lora

    # Keyed for another model: diffusers only warns and loads nothing.
    save_file({"unet.mid.lora_A.weight": torch.randn(4, 16), "unet.mid.lora_B.weight": torch.randn(16, 4)},
              tmp_path / "other-model.safetensors")  # fmt: skip
    pipe = base_holder.get().pipe
    with pytest.raises(LoraError, match="The LoRA other-model.safetensors reached none of the transformer's layers"):
        load_lora(pipe, tmp_path / "other-model.safetensors", "other")
    assert "other" not in pipe.get_list_adapters().get("transformer", [])


def test_the_lightning_load_logs_how_many_layers_it_reached(tiny_env, caplog):
    with caplog.at_level("INFO", logger="qwen_edit_worker.loras"):
        load_model(Settings.from_env(tiny_env(USE_LIGHTNING_LORA="true")))
    assert "reached 24 transformer layers" in caplog.text


def test_the_8bit_offload_retry_quantizes_the_text_encoder_too(tmp_path, monkeypatch):
    # bitsandbytes needs a GPU: record what the retry asks diffusers to load instead of loading it.
    from diffusers import QwenImageTransformer2DModel

    calls = {}
    monkeypatch.setattr(QwenImageTransformer2DModel, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: calls.setdefault("transformer", kw) and "transformer"))  # fmt: skip
    monkeypatch.setattr(QwenImageEditPlusPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: calls.setdefault("pipeline", kw)))  # fmt: skip
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "PRECISION_MODE": "8bit"})
    model_loader._load_8bit_with_cpu_offload(settings, str(tmp_path), torch.bfloat16, gpu_budget=2**30)
    assert calls["transformer"]["quantization_config"].load_in_8bit
    rest = calls["pipeline"]["quantization_config"].quant_mapping
    assert set(rest) == {"text_encoder"} and rest["text_encoder"].load_in_8bit
    assert calls["pipeline"]["transformer"] == "transformer"
