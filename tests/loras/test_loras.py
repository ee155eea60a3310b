"""Per-request LoRAs on the tiny model: every format diffusers reads, scaled as alpha/rank
says; fetched like images, cached on disk and on the GPU; bad ones refused in a sentence."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from config import Settings
from model_loader import ModelHolder
from qwen_edit_worker.loras.adapters import block_linears
from qwen_edit_worker.service import EditService
from tests.conftest import wait_for_idle_warm_ups
from tests.image_server import ImageServer
from tests.test_handler import SAMPLE

RANK, ALPHA = 4, 1.0  # alpha != rank: an ignored alpha shows
FORMATS = ("peft", "kohya", "lightx2v", "diffsynth", "comfyui")


@pytest.fixture(scope="module")
def holder(tiny_env) -> ModelHolder:
    """A model of this module's own: loading adapters changes the transformer's modules."""
    holder = ModelHolder(Settings.from_env(tiny_env()))
    holder.get()
    return holder


def low_rank(pipe, seed: int, kind: str = ".attn.to_", rank: int = RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random low-rank weights for the transformer blocks' linear layers of one kind."""
    generator = torch.Generator().manual_seed(seed)
    layers = {name: m for name, m in block_linears(pipe.transformer).items() if kind in name}
    return {name: (torch.randn(rank, m.in_features, generator=generator) * 0.5,
                   torch.randn(m.out_features, rank, generator=generator) * 0.5)
            for name, m in layers.items()}  # fmt: skip


def written(weights, fmt: str, alpha: float = ALPHA) -> bytes:
    """The same low-rank weights in one of the formats people publish (alpha kept, or folded in)."""
    state = {}
    for name, (down, up) in weights.items():
        rank, flat = down.shape[0], name.replace(".", "_")
        if fmt == "peft":  # diffusers/PEFT keys have no alpha: fold alpha/rank into up
            state |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up * alpha / rank}
        elif fmt == "kohya":
            state |= {f"lora_unet_{flat}.lora_down.weight": down, f"lora_unet_{flat}.lora_up.weight": up,
                      f"lora_unet_{flat}.alpha": torch.tensor(alpha)}  # fmt: skip
        elif fmt == "lightx2v":
            state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
        elif fmt == "diffsynth":
            state |= {f"{name}.lora_A.default.weight": down, f"{name}.lora_B.default.weight": up * alpha / rank}
        elif fmt == "comfyui":
            state |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up,
                      f"diffusion_model.{name}.alpha": torch.tensor(alpha)}  # fmt: skip
    buffer = io.BytesIO()
    buffer.write(_safetensors_bytes(state))
    return buffer.getvalue()


def _safetensors_bytes(state) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


@pytest.fixture
def server():
    srv = ImageServer()
    yield srv
    srv.close()


@pytest.fixture
def settings(tiny_env, tmp_path) -> Settings:
    # The LoRA cache lives in MODEL_DIR: a fresh one per test; the model comes from `holder`.
    return dataclasses.replace(Settings.from_env(tiny_env(ALLOW_PRIVATE_IMAGE_URLS="true")), model_dir=str(tmp_path))


def job(loras=None, seed: int = 5, **extra) -> dict:
    payload = {"prompt": "make it blue", "images": [SAMPLE], "width": 64, "height": 64, "seed": seed,
               "num_inference_steps": 2, **extra}  # fmt: skip
    if loras is not None:
        payload["loras"] = loras
    return {"id": f"job-{seed}", "input": payload}


def run(settings: Settings, holder: ModelHolder, *jobs: dict, service: EditService | None = None) -> list[dict]:
    async def scenario():
        svc = service or EditService(settings, holder=holder)
        try:
            return await asyncio.gather(*(svc.handle(j) for j in jobs))
        finally:
            if service is None:
                svc.close()

    return asyncio.run(scenario())


def pixels(answer: dict) -> np.ndarray:
    assert "output_image_base64" in answer, answer
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["output_image_base64"])))).astype(int)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_changes_each_module_by_scale_alpha_over_rank_up_down(holder, settings, server, fmt):
    weights = low_rank(holder.get().pipe, seed=1)
    server.serve_bytes(f"/{fmt}.safetensors", written(weights, fmt))
    service = EditService(settings, holder=holder)
    try:
        (answer,) = run(settings, holder, job([{"path": server.url(f"/{fmt}.safetensors"), "scale": 0.7}]), service=service)
        assert "output_image_base64" in answer, answer
        adapter = holder.get().adapters
        name = f"user_{answer['loras'][0]['sha256'][:16]}"
        layers = {n: m for n, m in holder.get().pipe.transformer.named_modules() if n in weights}
        for module, (down, up) in weights.items():
            expected = 0.7 * ALPHA / RANK * up @ down
            assert torch.allclose(layers[module].get_delta_weight(name), expected, atol=1e-5), (fmt, module)
        assert adapter.loads >= 1
    finally:
        service.close()


def test_the_same_weights_in_two_formats_give_the_same_pixels(holder, settings, server):
    weights = low_rank(holder.get().pipe, seed=2)
    server.serve_bytes("/a.safetensors", written(weights, "kohya"))
    server.serve_bytes("/b.safetensors", written(weights, "diffsynth"))
    a, b, base = run(settings, holder, job([{"path": server.url("/a.safetensors"), "scale": 3}]),
                     job([{"path": server.url("/b.safetensors"), "scale": 3}]), job())  # fmt: skip
    assert a["loras"][0]["sha256"] != b["loras"][0]["sha256"]
    assert np.abs(pixels(a) - pixels(b)).max() <= 1  # float32 sums in another order
    assert np.abs(pixels(a) - pixels(base)).max() > 3  # and the LoRA did something


def test_jobs_get_what_they_get_alone_and_a_lora_free_job_is_the_base_output(holder, settings, server, tiny_env):
    pipe = holder.get().pipe
    server.serve_bytes("/one.safetensors", written(low_rank(pipe, seed=3), "lightx2v"))
    server.serve_bytes("/two.safetensors", written(low_rank(pipe, seed=4, kind=".img_mlp."), "kohya"))
    one = [{"path": server.url("/one.safetensors"), "scale": 1.5}]
    both = [{"path": server.url("/two.safetensors")}, {"path": server.url("/one.safetensors"), "scale": -0.5}]
    alone = [run(settings, holder, j)[0] for j in (job(one), job(both), job())]
    together = run(settings, holder, job(one), job(both), job())
    for a, t in zip(alone, together):
        assert np.array_equal(pixels(a), pixels(t))
    fresh = ModelHolder(Settings.from_env(tiny_env()))
    (base,) = run(settings, fresh, job())
    assert np.array_equal(pixels(together[2]), pixels(base))  # bit-identical to a worker that never saw a LoRA
    (zero,) = run(settings, holder, job([{"path": server.url("/one.safetensors"), "scale": 0}]))
    assert np.array_equal(pixels(zero), pixels(base))
    assert together[1]["loras"] == [
        {"path": both[0]["path"], "scale": 1.0, "sha256": together[1]["loras"][0]["sha256"]},
        {"path": both[1]["path"], "scale": -0.5, "sha256": together[0]["loras"][0]["sha256"]},
    ]


def test_a_second_job_neither_downloads_nor_loads_the_lora_again(holder, settings, server):
    server.serve_bytes("/c.safetensors", written(low_rank(holder.get().pipe, seed=5), "peft"))
    service = EditService(settings, holder=holder)
    try:
        lora = [{"path": server.url("/c.safetensors")}]
        run(settings, holder, job(lora, seed=1), service=service)
        loads = holder.get().adapters.loads
        run(settings, holder, job(lora, seed=2), service=service)
        assert server.hits.count("/c.safetensors") == 1 and holder.get().adapters.loads == loads
    finally:
        service.close()
    # A new worker on the same MODEL_DIR finds the file on disk.
    run(settings, holder, job(lora, seed=3))
    assert server.hits.count("/c.safetensors") == 1


def test_the_disk_cache_stays_under_its_bound(holder, settings, server, tmp_path):
    pipe = holder.get().pipe
    small = dataclasses.replace(settings, lora_cache_gb=2.5 * len(written(low_rank(pipe, seed=6), "peft")) / 1024**3)
    for seed in range(6, 10):
        server.serve_bytes(f"/{seed}.safetensors", written(low_rank(pipe, seed=seed), "peft"))
        (answer,) = run(small, holder, job([{"path": server.url(f"/{seed}.safetensors")}]))
        assert "output_image_base64" in answer
    kept = list((tmp_path / "loras").glob("*.safetensors"))
    assert len(kept) == 2  # the two most recently used


def test_bad_loras_get_a_sentence_naming_the_entry_and_the_worker_keeps_serving(holder, settings, server):
    pipe = holder.get().pipe
    server.serve_bytes("/text.safetensors", b"this is not a safetensors file at all")
    server.serve_bytes("/other.safetensors", _safetensors_bytes({"lora_unet_down_blocks_0.lora_down.weight": torch.ones(4, 8),
                                                                 "unet.mid.lora_A.weight": torch.ones(4, 8)}))  # fmt: skip
    wrong = {name: (down[:, :-1], up) for name, (down, up) in low_rank(pipe, seed=11).items()}  # one column short
    server.serve_bytes("/shape.safetensors", written(wrong, "peft"))
    server.serve_bytes("/te.safetensors", _safetensors_bytes({"lora_te_text_model_encoder_layers_0.lora_down.weight": torch.ones(4, 8)}))
    server.serve_bytes("/big.safetensors", b"\0" * 2_000_000)
    server.trickle("/slow.safetensors", total=100, every_s=0.5)
    cases = {
        "/text.safetensors": "is not a safetensors file.",
        "/other.safetensors": "matches none of the transformer's layers: it is not a Qwen-Image LoRA.",
        "/shape.safetensors": "does not fit this model: its layer shapes differ from the transformer's.",
        "/te.safetensors": "is a text-encoder LoRA; this worker applies LoRAs to the transformer only.",
        "/big.safetensors": "is larger than MAX_LORA_BYTES (1048576 bytes).",
        "/slow.safetensors": "took longer than LORA_DOWNLOAD_TIMEOUT_S (1 s) to download.",
    }
    limited = dataclasses.replace(settings, max_lora_bytes=1024**2, lora_download_timeout_s=1.0)
    for path, ending in cases.items():
        (answer,) = run(limited, holder, job([{"path": server.url(path)}]))
        url = server.url(path)
        assert answer == {"error": f"Input field 'loras[0].path' ({url}) {ending}"}, answer
    (good,) = run(limited, holder, job())
    assert "output_image_base64" in good


def test_a_refused_address_is_never_fetched(holder, tiny_env, tmp_path, server):
    strict = dataclasses.replace(Settings.from_env(tiny_env()), model_dir=str(tmp_path))
    (answer,) = run(strict, holder, job([{"path": server.url("/x.safetensors")}]))
    assert answer["error"].startswith("Input field 'loras[0].path' (http://127.0.0.1:")
    assert "private or reserved address (127.0.0.1)" in answer["error"] and server.hits == []


def test_fp8_endpoints_say_they_take_no_loras(holder, settings, server):
    fp8 = dataclasses.replace(settings, precision_mode="fp8")
    (answer,) = run(fp8, holder, job([{"path": server.url("/x.safetensors")}]))
    assert answer["error"].startswith("Input field 'loras' cannot be used with PRECISION_MODE=fp8")
    assert server.hits == []


def _in_hub_cache(root, repo: str, files: dict[str, bytes], revision: str = "a" * 40) -> None:
    """Lay files out as huggingface_hub's cache does (models--owner--name/snapshots/rev)."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    for name, data in files.items():
        path = repo_dir / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)


def test_a_repo_lora_is_found_in_runpods_model_cache_without_downloading(holder, settings, tmp_path, monkeypatch):
    from qwen_edit_worker.loras import lora_store

    cache = tmp_path / "runpod-cache"
    lora = written(low_rank(holder.get().pipe, seed=12), "kohya")
    _in_hub_cache(cache, "acme/one-file", {"style.safetensors": lora})
    _in_hub_cache(cache, "acme/two-files", {"a.safetensors": lora, "b/c.safetensors": lora})
    monkeypatch.setattr(lora_store, "RUNPOD_HF_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no request leaves the machine
    named, only, two, unknown = run(settings, holder, job([{"path": "acme/two-files", "weight_name": "b/c.safetensors"}]),
                                    job([{"path": "acme/one-file"}]), job([{"path": "acme/two-files"}]),
                                    job([{"path": "acme/absent"}]))  # fmt: skip
    assert named["loras"][0]["sha256"] == only["loras"][0]["sha256"]  # the same bytes under two names
    assert named["loras"][0]["weight_name"] == "b/c.safetensors" and "weight_name" not in only["loras"][0]
    assert two == {"error": "Input field 'loras[0].path' (acme/two-files) holds 2 .safetensors files; name one with 'weight_name'."}
    assert unknown == {"error": "Input field 'loras[0].path' (acme/absent) is not in the model caches, and HF_HUB_OFFLINE "
                                "keeps this worker from downloading it."}  # fmt: skip


@pytest.fixture
def hub(monkeypatch):
    """A loopback Hub, where huggingface_hub's HF_ENDPOINT would point."""
    import huggingface_hub.constants
    from huggingface_hub import hf_api

    from tests.hub_server import HubServer

    stand_in = HubServer()
    # What HF_ENDPOINT sets when huggingface_hub is imported (it was imported before this test).
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", stand_in.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", stand_in.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", stand_in.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield stand_in
    stand_in.close()


def test_a_repo_lora_is_downloaded_from_the_hub_once_and_a_too_large_one_never(holder, settings, hub):
    lora = written(low_rank(holder.get().pipe, seed=13), "lightx2v")
    hub.repos["acme/style"] = {"README.md": b"# style", "style-v2.safetensors": lora}
    hub.repos["acme/huge"] = {"huge.safetensors": lora + b"\0" * (2 * 1024**2)}
    small = dataclasses.replace(settings, max_lora_bytes=1024**2 + len(lora))
    first, = run(small, holder, job([{"path": "acme/style", "scale": 0.5}], seed=14))
    second, = run(small, holder, job([{"path": "acme/style", "scale": 0.5}], seed=14))
    huge, missing = run(small, holder, job([{"path": "acme/huge"}]), job([{"path": "acme/style", "weight_name": "x.safetensors"}]))
    assert "error" not in first, first
    assert first["loras"][0]["sha256"] == __import__("hashlib").sha256(lora).hexdigest()
    assert np.array_equal(pixels(first), pixels(second))
    assert hub.downloads("acme/style") == 1  # the second job found it in the worker's cache
    assert huge == {"error": f"Input field 'loras[0].path' (acme/huge) is larger than MAX_LORA_BYTES ({small.max_lora_bytes} bytes)."}
    assert hub.downloads("acme/huge") == 0  # refused from its size, before any byte
    assert missing == {"error": "Input field 'loras[0].path' (acme/style) names a file that the repo does not have."}


def test_hub_failures_say_which_one_it_was(holder, settings, hub, monkeypatch, caplog):
    """Not found, gated or private (HF_TOKEN), and out of reach: each its own sentence, the
    cause in the log."""
    import huggingface_hub.constants

    hub.repos["acme/gated"] = {"style.safetensors": b"x"}
    hub.gated.add("acme/gated")
    unknown, gated = run(settings, holder, job([{"path": "acme/absent"}]), job([{"path": "acme/gated"}]))
    assert unknown == {"error": "Input field 'loras[0].path' (acme/absent) names no repo on Hugging Face, or a private one "
                                "that the endpoint's HF_TOKEN does not open."}  # fmt: skip
    assert gated == {"error": "Input field 'loras[0].path' (acme/gated) is a gated repo: accept its terms on huggingface.co "
                              "and set HF_TOKEN on the endpoint."}  # fmt: skip
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", "http://127.0.0.1:9")
    (away,) = run(settings, holder, job([{"path": "acme/elsewhere"}]))
    assert away == {"error": "Input field 'loras[0].path' (acme/elsewhere) could not be downloaded: Hugging Face could not "
                             "be reached; retry the job."}  # fmt: skip
    assert "Hugging Face: acme/gated failed: GatedRepoError (403)" in caplog.text


def test_a_compiled_worker_hot_swaps_loras_without_recompiling(inductor_cache, tiny_env, tmp_path, server, holder, settings, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    # One image per batch: the idle warm-ups the test waits for are the LoRA slots' alone.
    compiled = dataclasses.replace(Settings.from_env(tiny_env(COMPILE_TRANSFORMER="true", MAX_LORAS="2", MAX_LORA_RANK="8",
                                                              MAX_BATCH_SIZE="1", ALLOW_PRIVATE_IMAGE_URLS="true")),
                                   model_dir=str(tmp_path))  # fmt: skip
    pipe = holder.get().pipe
    server.serve_bytes("/a.safetensors", written(low_rank(pipe, seed=31), "kohya"))
    server.serve_bytes("/b.safetensors", written(low_rank(pipe, seed=32, kind=".img_mlp.", rank=2), "peft"))
    a, b = {"path": server.url("/a.safetensors"), "scale": 2.0}, {"path": server.url("/b.safetensors"), "scale": 3.0}
    sequence = [None, [a], [a, b], [b], [b, a], None, [a]]
    service = EditService(compiled)
    try:
        # The first job of a new shape compiles it for 0, 1 and 2 active slots: then switching LoRAs must not.
        answers = [run(compiled, None, job(loras, seed=40), service=service)[0] for loras in sequence[:3]]
        wait_for_idle_warm_ups(service)  # compiled while idle
        graphs = counters["stats"]["unique_graphs"]
        answers += [run(compiled, None, job(loras, seed=40), service=service)[0] for loras in sequence[3:]]
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation across LoRA sets
        model = service.holder.get()
        assert model.compiled and model.lora_slots == ("slot0", "slot1")
        # A one-LoRA job runs one slot, not both: the other, still holding a LoRA, is inactive.
        assert model.pipe.transformer.active_adapters() == ["slot0"]
    finally:
        service.close()
    eager = [run(settings, holder, job(loras, seed=40))[0] for loras in sequence]  # named adapters, eager
    for loras, hot, reference in zip(sequence, answers, eager):
        assert np.abs(pixels(hot) - pixels(reference)).max() <= 2, loras  # compiled float32: within 2/255
    assert np.array_equal(pixels(answers[0]), pixels(answers[5]))  # LoRA-free before and after: the same
    assert not np.array_equal(pixels(answers[1]), pixels(answers[0]))


def test_slots_refuse_a_higher_rank_and_layers_outside_the_blocks(tiny_env, settings, server):
    from model_loader import load_model
    from qwen_edit_worker.loras.adapters import prepare_slots

    model = load_model(Settings.from_env(tiny_env()))
    # As a compiled worker's, without compiling:
    model.lora_slots, model.lora_slot_count, model.lora_rank = prepare_slots(model.pipe, 1, 2), 1, 2

    class Loaded:
        def get(self):
            return model

    pipe = model.pipe
    server.serve_bytes("/rank4.safetensors", written(low_rank(pipe, seed=41), "lightx2v"))
    outside = {**low_rank(pipe, seed=42, rank=2), "proj_out": (torch.ones(2, pipe.transformer.proj_out.in_features),
                                                             torch.ones(pipe.transformer.proj_out.out_features, 2))}  # fmt: skip
    server.serve_bytes("/outside.safetensors", written(outside, "peft"))
    server.serve_bytes("/rank2.safetensors", written(low_rank(pipe, seed=43, rank=2), "peft"))
    high, out, good, plain = run(settings, Loaded(), job([{"path": server.url("/rank4.safetensors")}]),
                                 job([{"path": server.url("/outside.safetensors")}]),
                                 job([{"path": server.url("/rank2.safetensors")}]), job())  # fmt: skip
    assert high["error"].endswith("has rank 4, above MAX_LORA_RANK (2).")
    assert out["error"].endswith("targets layers outside the transformer blocks (transformer.proj_out).")
    assert "output_image_base64" in good and "output_image_base64" in plain


def test_loras_from_the_environment_apply_to_jobs_that_send_none(tiny_env, holder, settings, server):
    from config import ConfigError

    server.serve_bytes("/house.safetensors", written(low_rank(holder.get().pipe, seed=51), "kohya"))
    house = {"path": server.url("/house.safetensors"), "scale": 2.0}
    fixed = dataclasses.replace(settings, default_loras=(house,))
    service = EditService(fixed, holder=holder)
    try:
        default, explicit_none, named = run(fixed, holder, job(), job([]), job([house]), service=service)
    finally:
        service.close()
    assert server.hits.count("/house.safetensors") == 1  # fetched once, at start
    assert default["loras"][0]["path"] == house["path"] and np.array_equal(pixels(default), pixels(named))
    assert explicit_none["loras"] == [] and not np.array_equal(pixels(explicit_none), pixels(default))
    with pytest.raises(ConfigError, match="LORAS must be a JSON list of objects"):
        Settings.from_env(tiny_env(LORAS="owner/name"))
    with pytest.raises(ConfigError, match=r"LORAS entry 0 has an unusable 'scale': it must be a number from -4 to 4\."):
        from qwen_edit_worker.jobs import schema

        schema.default_loras(Settings.from_env(tiny_env(LORAS='[{"path": "owner/name", "scale": 9}]')))


def first_job_during_the_warm_up(settings: Settings, request: dict, monkeypatch, caplog) -> tuple[dict, list[str], int]:
    """`request` sent to a new service whose start-up warm-up waits until the job is queued
    (however fast the warm-up, no idle moment comes before the job), then the idle warm-ups
    left to run. The answer, the worker's log messages, and how many came before the answer."""
    import logging

    from qwen_edit_worker.engine.edit_engine import EditEngine

    services, warm_up = [], EditEngine.warm_up

    def warm_up_once_a_job_waits(engine):
        deadline = time.monotonic() + 60
        while not (services and services[0].batcher.queued) and time.monotonic() < deadline:
            time.sleep(0.02)
        warm_up(engine)

    monkeypatch.setattr(EditEngine, "warm_up", warm_up_once_a_job_waits)
    service = EditService(settings)
    services.append(service)
    with caplog.at_level(logging.INFO, logger="qwen_edit_worker"):
        try:
            answer = run(settings, None, request, service=service)[0]
            answered = len(caplog.records)
            wait_for_idle_warm_ups(service)
        finally:
            service.close()  # lets the idle step that is running finish, and log, first
    return answer, [r.getMessage() for r in caplog.records], answered


def test_the_first_job_waits_neither_for_the_lora_slots_nor_their_graphs(inductor_cache, tiny_env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    compiled = dataclasses.replace(Settings.from_env(tiny_env(COMPILE_TRANSFORMER="true", MAX_LORAS="2", MAX_LORA_RANK="8")),
                                   model_dir=str(tmp_path))  # fmt: skip
    answer, messages, answered = first_job_during_the_warm_up(compiled, job(seed=41), monkeypatch, caplog)
    assert "output_image_base64" in answer
    before, after = messages[:answered], messages[answered:]
    assert any("warm-up edit took" in m for m in before)  # the base shape: compiled before the first job
    assert not any("LoRA slots on" in m or "LoRA slots of rank" in m for m in before)
    assert sum("LoRA slots of rank 8 prepared" in m for m in after) == 1  # then, while idle, the slots
    assert sum("LoRA slots on" in m for m in after) == 2  # and their graphs for 1 and 2 active slots
    assert any("cold start: LoRA slots and batch sizes compiled" in m for m in after)


def test_a_lora_job_before_the_idle_warm_ups_prepares_the_slots_itself(inductor_cache, tiny_env, tmp_path, server, holder, settings,
                                                                       monkeypatch, caplog):  # fmt: skip
    """The slots are prepared after the start-up warm-up; a LoRA job that comes first (queued
    during the warm-up, so that no idle moment comes between) prepares them, once, and gets
    the LoRA's pixels."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    compiled = dataclasses.replace(Settings.from_env(tiny_env(COMPILE_TRANSFORMER="true", MAX_LORAS="2", MAX_LORA_RANK="8",
                                                              ALLOW_PRIVATE_IMAGE_URLS="true")), model_dir=str(tmp_path))  # fmt: skip
    server.serve_bytes("/a.safetensors", written(low_rank(holder.get().pipe, seed=33), "kohya"))
    lora = [{"path": server.url("/a.safetensors"), "scale": 2.0}]
    hot, messages, answered = first_job_during_the_warm_up(compiled, job(lora, seed=44), monkeypatch, caplog)
    prepared = [n for n, m in enumerate(messages) if "LoRA slots of rank 8 prepared" in m]
    assert len(prepared) == 1 and prepared[0] < answered  # by the job, and not again while idle
    eager = run(settings, holder, job(lora, seed=44))[0]
    assert np.abs(pixels(hot) - pixels(eager)).max() <= 2  # compiled float32: within 2/255
    assert not np.array_equal(pixels(hot), pixels(run(settings, holder, job(seed=44))[0]))  # the LoRA did apply
