"""LoRA files as users bring them: written by diffusers' own `save_lora_weights` from a peft
`LoraConfig`, with text-encoder parts, biases, DoRA, NaNs and hostile headers. Both ways of
applying a LoRA (named adapters, eager; slots, for a compiled transformer) take the same
files and give the same pixels; a file either applies at the strength its metadata says
or is refused in one short sentence."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import time

import numpy as np
import pytest
import torch

from config import Settings
from tests.loras.test_loras import _safetensors_bytes, holder, job, low_rank, pixels, run, server, settings, written  # noqa: F401

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "img_mlp.net.2"]


def trained(config, seed: int) -> tuple[bytes, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A LoRA as diffusers' training scripts save it: peft adapters on the transformer,
    `get_peft_model_state_dict`, then `save_lora_weights(..., transformer_lora_adapter_metadata=
    config.to_dict())`. The file's bytes and each layer's (down, up) weights."""
    import tempfile
    from pathlib import Path

    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    from qwen_edit_worker.testing.tiny_model import TINY_TRANSFORMER

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    transformer.add_adapter(config)
    state = get_peft_model_state_dict(transformer)
    with tempfile.TemporaryDirectory() as folder:
        QwenImageEditPlusPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                                    transformer_lora_adapter_metadata=config.to_dict())  # fmt: skip
        data = (Path(folder) / "pytorch_lora_weights.safetensors").read_bytes()
    layers = {key.removesuffix(".lora_A.weight"): (value, state[key.replace("lora_A", "lora_B")])
              for key, value in state.items() if key.endswith(".lora_A.weight")}  # fmt: skip
    return data, layers


def config(**overrides):
    from peft import LoraConfig

    settings = dict(r=8, lora_alpha=4, target_modules=TARGETS, rank_pattern={"to_k": 4}, alpha_pattern={"to_v": 16},
                    init_lora_weights=False)  # fmt: skip
    return LoraConfig(**{**settings, **overrides})


def scaling(layer: str, rslora: bool = False) -> float:
    rank = 4 if layer.endswith("to_k") else 8
    alpha = 16 if layer.endswith("to_v") else 4
    return alpha / (math.sqrt(rank) if rslora else rank)


def slotted(tiny_env, rank: int = 16):
    """A model with LoRA slots, as a compiled worker has them, without compiling."""
    from model_loader import load_model
    from qwen_edit_worker.loras.adapters import prepare_slots

    model = load_model(Settings.from_env(tiny_env()))
    model.lora_slots, model.lora_slot_count, model.lora_rank = prepare_slots(model.pipe, 2, rank), 2, rank

    class Loaded:
        def get(self):
            return model

    return Loaded()


@pytest.fixture(scope="module")
def slots(tiny_env):
    return slotted(tiny_env)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_a_diffusers_trained_lora_applies_as_its_metadata_says_on_both_paths(holder, slots, settings, server, rslora):
    data, layers = trained(config(use_rslora=rslora), seed=1)
    server.serve_bytes("/trained.safetensors", data)
    request = job([{"path": server.url("/trained.safetensors"), "scale": 0.7}], seed=7)
    (eager,) = run(settings, holder, request)
    (hot,) = run(settings, slots, request)
    name = f"user_{eager['loras'][0]['sha256'][:16]}"
    for model, adapter in ((holder.get(), name), (slots.get(), "slot0")):
        modules = dict(model.pipe.transformer.named_modules())
        for layer, (down, up) in layers.items():
            expected = 0.7 * scaling(layer, rslora) * up @ down
            assert torch.allclose(modules[layer].get_delta_weight(adapter), expected, atol=1e-5), (adapter, layer)
    assert np.abs(pixels(eager) - pixels(hot)).max() <= 1


def test_text_encoder_parts_and_biases_apply_alike_on_both_paths(holder, slots, settings, server):
    weights = low_rank(holder.get().pipe, seed=3)
    plain = written(weights, "kohya")
    server.serve_bytes("/plain.safetensors", plain)
    server.serve_bytes("/both.safetensors", _safetensors_bytes({
        **_state(plain),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 8),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}))  # fmt: skip
    biased = _state(written(weights, "peft"))
    generator = torch.Generator().manual_seed(5)
    biases = {key.replace(".weight", ".bias"): torch.randn(value.shape[0], generator=generator)
              for key, value in biased.items() if ".lora_B." in key}  # fmt: skip
    server.serve_bytes("/bias.safetensors", _safetensors_bytes({**biased, **biases}))
    jobs = [job([{"path": server.url(f"/{name}.safetensors"), "scale": 1.5}], seed=8) for name in ("both", "bias", "plain")]
    eager, hot = run(settings, holder, *jobs), run(settings, slots, *jobs)
    for a, b in zip(eager, hot):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert eager[0]["warnings"] == hot[0]["warnings"] == [
        "loras[0] also holds text-encoder weights, which were not applied: this worker applies LoRAs to the "
        "transformer only."
    ]
    assert eager[1]["warnings"] == eager[2]["warnings"] == []
    assert np.array_equal(pixels(eager[0]), pixels(eager[2]))  # the transformer part, as the file without the rest
    assert np.abs(pixels(eager[1]) - pixels(eager[2])).max() > 3  # the biases applied, not dropped


def _state(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_the_same_file_under_two_urls_adds_its_scales(holder, slots, settings, server):
    data = written(low_rank(holder.get().pipe, seed=9), "kohya")
    server.serve_bytes("/one.safetensors", data)
    server.serve_bytes("/same.safetensors", data)
    one, same = server.url("/one.safetensors"), server.url("/same.safetensors")
    for loaded in (holder, slots):
        opposite, split, whole, base = run(settings, loaded, job([{"path": one, "scale": 1}, {"path": same, "scale": -1}]),
                                           job([{"path": one, "scale": 0.5}, {"path": same, "scale": 0.25}]),
                                           job([{"path": one, "scale": 0.75}]), job())  # fmt: skip
        assert np.abs(pixels(opposite) - pixels(base)).max() <= 1
        assert np.abs(pixels(split) - pixels(whole)).max() <= 1
        assert np.abs(pixels(whole) - pixels(base)).max() > 3


def _nan_lora(pipe, poison) -> bytes:
    state = _state(written(low_rank(pipe, seed=10), "kohya"))
    key = next(k for k in state if k.endswith(poison[0]))
    state[key] = poison[1](state[key])
    return _safetensors_bytes(state)


def test_non_finite_and_dora_files_are_refused_in_a_sentence(holder, slots, settings, server):
    pipe = holder.get().pipe
    peft = _state(written(low_rank(pipe, seed=11), "peft"))
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 1e-300, "transformer.lora_alpha": 1e300,
                                                     "transformer.target_modules": ["to_q"]})}  # fmt: skip
    dora_metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 4,
                                                          "transformer.use_dora": True})}  # fmt: skip
    magnitudes = {k.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(v.shape[1])
                  for k, v in peft.items() if ".lora_A." in k}  # fmt: skip
    files = {
        "/nan.safetensors": _nan_lora(pipe, (".lora_up.weight", lambda t: t.index_fill(0, torch.tensor([0]), math.nan))),
        "/inf.safetensors": _nan_lora(pipe, (".lora_down.weight", lambda t: t.index_fill(1, torch.tensor([1]), math.inf))),
        "/f64.safetensors": _nan_lora(pipe, (".lora_up.weight", lambda t: t.double() * 1e300)),
        "/alpha.safetensors": _nan_lora(pipe, (".alpha", lambda t: torch.tensor(math.nan))),
        "/meta.safetensors": _with_metadata(peft, metadata),
        "/dora_scale.safetensors": _safetensors_bytes({**_state(written(low_rank(pipe, seed=12), "kohya")),
                                                       "lora_unet_transformer_blocks_0_attn_to_q.dora_scale": torch.ones(1, 32)}),
        "/magnitude.safetensors": _safetensors_bytes({**peft, **magnitudes}),
        "/use_dora.safetensors": _with_metadata(peft, dora_metadata),
    }
    for path, data in files.items():
        server.serve_bytes(path, data)
    not_finite = "holds weights that are not finite numbers in bfloat16"
    expected = {
        "/nan.safetensors": not_finite, "/inf.safetensors": not_finite, "/f64.safetensors": not_finite,
        "/alpha.safetensors": not_finite,
        "/meta.safetensors": "has unusable 'lora_adapter_metadata' metadata: its lora_alpha over r overflows bfloat16.",
        "/dora_scale.safetensors": "is a DoRA file (it holds magnitude vectors); this worker applies plain LoRAs only.",
        "/magnitude.safetensors": "is a DoRA file (it holds magnitude vectors); this worker applies plain LoRAs only.",
        "/use_dora.safetensors": "is a DoRA file (its metadata says use_dora); this worker applies plain LoRAs only.",
    }  # fmt: skip
    for loaded in (holder, slots):
        answers = run(settings, loaded, *(job([{"path": server.url(path)}]) for path in files), job())
        for (path, ending), answer in zip(expected.items(), answers):
            assert answer["error"].startswith(f"Input field 'loras[0].path' ({server.url(path)}) {ending}"), answer
        assert "output_image_base64" in answers[-1]  # and the worker serves on


def _with_metadata(state: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def test_a_lora_that_overflows_the_model_fails_its_jobs_once_not_with_a_blank_image(holder, settings, server):
    huge = {name: (down.sign() * 1e18, up.sign() * 1e18) for name, (down, up) in low_rank(holder.get().pipe, seed=13).items()}
    server.serve_bytes("/huge.safetensors", written(huge, "peft", alpha=4.0))
    from qwen_edit_worker.service import EditService

    service = EditService(settings, holder=holder)
    batches = []
    run_batch = service.batcher.lanes[0].run_batch
    service.batcher.lanes = (dataclasses.replace(service.batcher.lanes[0], run_batch=lambda r: batches.append(len(r)) or run_batch(r)),)
    try:
        lora = [{"path": server.url("/huge.safetensors")}]
        answers = run(settings, holder, job(lora, seed=1), job(lora, seed=2), service=service)
    finally:
        service.close()
    for answer in answers:
        assert answer == {"error": "Input field 'loras' made the model's output non-finite (NaN or infinity): the LoRAs' "
                                   "weights or scales are too large for this model, and no image was made."}  # fmt: skip
    assert sum(batches) == 2  # one batch of two, or two of one: never retried one by one


def _header_only(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def test_hostile_headers_are_refused_on_the_download_thread_quickly_and_quoted_short(holder, settings, server, monkeypatch):
    from qwen_edit_worker.loras import adapters

    empty = {f"lora_unet_transformer_blocks_0_attn_to_q{i}.lora_down.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
             for i in range(60_000)}  # fmt: skip
    forged = "transformer.transformer_blocks.0.attn.to_q\n2026-12-07 05:00:00 INFO forged: line"
    files = {
        "/many.safetensors": _header_only(empty),
        "/huge-header.safetensors": _header_only({"__metadata__": {"x": "y" * (9 * 1024**2)}}),
        "/long-key.safetensors": _safetensors_bytes({"k" * 2_000_000: torch.ones(1)}),
        "/forged.safetensors": _safetensors_bytes({f"{forged}.lora_A.weight": torch.ones(4, 32), f"{forged}.lora_X": torch.ones(1)}),
        "/nested.safetensors": _with_metadata({"transformer.a.lora_A.weight": torch.ones(1, 1)},
                                              {"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000}),
        "/deep.safetensors": _with_metadata({"transformer.a.lora_A.weight": torch.ones(1, 1)},
                                            {"lora_adapter_metadata": json.dumps({"transformer.r": [[[[[[[[[[1]]]]]]]]]]})}),
    }
    for path, data in files.items():
        server.serve_bytes(path, data)
    gpu_reads = []
    monkeypatch.setattr(adapters, "read_lora", lambda *a: gpu_reads.append(a) or pytest.fail("a refused file reached the GPU thread"))
    big = dataclasses.replace(settings, max_lora_bytes=64 * 1024**2)
    answers = run(big, holder, *(job([{"path": server.url(path)}]) for path in files))
    endings = {
        "/many.safetensors": "holds 60000 tensors; a LoRA holds at most 50000.",
        "/huge-header.safetensors": "has a header of",
        "/long-key.safetensors": "has a tensor name of 2000000 characters; at most 512 are allowed.",
        "/forged.safetensors": "holds weights that are not LoRA up/down projections",
        "/nested.safetensors": "has unusable 'lora_adapter_metadata' metadata: it is not JSON.",
        "/deep.safetensors": "has unusable 'lora_adapter_metadata' metadata: it must be one JSON object of LoRA settings.",
    }
    for (path, ending), answer in zip(endings.items(), answers):
        assert answer["error"].startswith(f"Input field 'loras[0].path' ({server.url(path)}) {ending}"), answer
        assert len(answer["error"]) < 300 and "\n" not in answer["error"]
    assert "\\n2026-12-07" in answers[3]["error"]  # the key's newline quoted, not written into the log
    assert gpu_reads == []


def test_refused_content_is_refused_again_without_reading_it(holder, settings, server, monkeypatch):
    from qwen_edit_worker.loras import lora_files

    data = _nan_lora(holder.get().pipe, (".lora_up.weight", lambda t: t * math.inf))
    server.serve_bytes("/a.safetensors", data)
    server.serve_bytes("/b.safetensors", data)
    reads = []
    check = lora_files.check_file
    monkeypatch.setattr(lora_files, "check_file", lambda *a: reads.append(a) or check(*a))
    from qwen_edit_worker.service import EditService

    service = EditService(settings, holder=holder)
    try:
        first, second = (run(settings, holder, job([{"path": server.url(p)}]), service=service)[0]
                         for p in ("/a.safetensors", "/b.safetensors"))  # fmt: skip
    finally:
        service.close()
    assert first["error"].split(") ", 1)[1] == second["error"].split(") ", 1)[1]
    assert second["error"].startswith(f"Input field 'loras[0].path' ({server.url('/b.safetensors')}) holds weights")
    assert len(reads) == 1


def test_replica_threads_change_adapters_one_at_a_time(tiny_env, settings, server, monkeypatch):
    """Replicas on threads (REPLICA_PROCESSES=false) share one process: peft creates adapter
    layers under accelerate's `init_empty_weights`, which patches torch.nn.Module for every
    thread, so two loads at once left tensors on the meta device."""
    from diffusers import QwenImageEditPlusPipeline

    from model_loader import ModelHolder
    from qwen_edit_worker.service import EditService

    holders = [ModelHolder(Settings.from_env(tiny_env())) for _ in range(2)]
    for h in holders:
        h.get()
    inside, overlaps = [], []
    load = QwenImageEditPlusPipeline.load_lora_into_transformer.__func__

    def slow_load(cls, *args, **kwargs):  # where every LoRA load goes, whichever way it came
        inside.append(1)
        deadline = time.monotonic() + 1.0
        while len(inside) < 2 and time.monotonic() < deadline:  # the other lane, if it can enter meanwhile
            time.sleep(0.01)
        overlaps.append(len(inside))
        try:
            return load(cls, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(QwenImageEditPlusPipeline, "load_lora_into_transformer", classmethod(slow_load))
    server.serve_bytes("/lane.safetensors", written(low_rank(holders[0].get().pipe, seed=14), "kohya"))
    service = EditService(dataclasses.replace(settings, max_batch_size=1), replicas=holders)  # a job a lane
    try:
        lora = [{"path": server.url("/lane.safetensors")}]
        answers = run(settings, None, *(job(lora, seed=s) for s in range(4)), service=service)
    finally:
        service.close()
    assert overlaps == [1, 1]  # one load a lane, one at a time
    for h in holders:
        assert not any(p.is_meta for p in h.get().pipe.transformer.parameters())
    (alone,) = run(settings, holders[0], job([{"path": server.url("/lane.safetensors")}], seed=0))
    assert np.array_equal(pixels(answers[0]), pixels(alone))


def test_replica_processes_pass_a_loras_sentence_back_intact():
    import multiprocessing

    from qwen_edit_worker.gpus.replica_processes import _ChildPipe, _error
    from qwen_edit_worker.jobs.schema import InputError
    from qwen_edit_worker.loras.lora_files import LoraError

    ours, theirs = multiprocessing.Pipe()
    pipe = _ChildPipe(theirs, engine=None)
    sentence = "Input field 'loras[0].path' (owner/name) matches none of the transformer's layers: it is not a Qwen-Image LoRA."

    def refuse():
        raise LoraError(sentence)

    assert pipe.answer(refuse)
    kind, *rest = ours.recv()
    error = _error("replica-1", *rest)
    assert kind == "error" and isinstance(error, InputError) and str(error) == sentence
    ours.send(("stop", None))
