"""The batched engine against diffusers' own pipeline, on the tiny model in float32."""

from __future__ import annotations

import dataclasses
import threading

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as stock_module
import numpy as np
import pytest
import torch

from config import ConfigError, Settings
from qwen_edit_worker.engine.edit_engine import EditRequest, pad_and_stack
from tests.conftest import random_image

TOLERANCE = 1e-4  # float32; measured differences are around 1e-6

IMAGE_A = random_image(64, 48, seed=1)
IMAGE_B = random_image(40, 64, seed=2)


def stock_pipeline_images(pipe, request: EditRequest) -> np.ndarray:
    """What `QwenImageEditPlusPipeline.__call__` makes for the request, alone, with its seed."""
    kwargs = {}
    if request.do_cfg:
        kwargs["negative_prompt"] = request.negative_prompt or " "
    return pipe(
        image=list(request.images),
        prompt=request.prompt,
        true_cfg_scale=request.true_cfg_scale,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="np",
        **kwargs,
    ).images


@pytest.fixture
def stock_reference_area(monkeypatch, tiny_settings):
    # The stock pipeline encodes references at a module constant; the engine makes it a setting.
    monkeypatch.setattr(stock_module, "VAE_IMAGE_SIZE", tiny_settings.reference_image_area)


def request(prompt="make the sky blue", seed=7, cfg=1.0, **kwargs) -> EditRequest:
    defaults = dict(images=(IMAGE_A, IMAGE_B), num_inference_steps=3, width=64, height=48)
    defaults.update(kwargs)
    return EditRequest(prompt=prompt, seed=seed, true_cfg_scale=cfg, **defaults)


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_batch_of_one_matches_the_stock_pipeline(engine, base_holder, stock_reference_area, cfg):
    edit = request(cfg=cfg, negative_prompt="blurry")
    ours = engine.run_batch([edit])[0].images[0]
    theirs = stock_pipeline_images(base_holder.get().pipe, edit)[0]
    assert ours.shape == theirs.shape == (48, 64, 3)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_single_reference_image_and_default_size_match_the_stock_pipeline(engine, base_holder, stock_reference_area):
    edit = request(images=(IMAGE_B,), width=None, height=None)
    ours = engine.run_batch([edit])[0]
    # The stock pipeline sizes the output from the last image's aspect ratio at its default area.
    pipe = base_holder.get().pipe
    width, height = stock_module.calculate_dimensions(engine.default_output_area, IMAGE_B.size[0] / IMAGE_B.size[1])
    theirs = stock_pipeline_images(pipe, request(images=(IMAGE_B,), width=width, height=height))[0]
    assert (ours.width, ours.height) == (width, height)
    assert np.abs(ours.images[0] - theirs).max() < TOLERANCE


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_result_in_a_batch_equals_result_alone(engine, cfg):
    other_cfg = cfg if cfg == 1.0 else 6.0
    first = request(cfg=cfg)
    # A longer prompt forces padding and a text mask; two images; another CFG scale.
    second = request(prompt="turn the whole scene into a detailed watercolor painting", seed=99, cfg=other_cfg, num_images=2)
    together = engine.run_batch([first, second])
    assert [r.batch_size for r in together] == [2, 2]
    alone_first = engine.run_batch([first])[0]
    alone_second = engine.run_batch([second])[0]
    assert alone_first.batch_size == 1
    assert np.abs(together[0].images[0] - alone_first.images[0]).max() < TOLERANCE
    for in_batch, solo in zip(together[1].images, alone_second.images, strict=True):
        assert np.abs(in_batch - solo).max() < TOLERANCE


def test_image_k_of_a_request_uses_seed_plus_k(engine):
    several = engine.run_batch([request(seed=1000, num_images=3)])[0].images
    for k in range(3):
        single = engine.run_batch([request(seed=1000 + k)])[0].images[0]
        assert np.abs(several[k] - single).max() < TOLERANCE
    assert np.abs(several[0] - several[1]).max() > 0.01  # different seeds, different images


def test_same_seed_same_pixels_and_another_seed_differs(engine):
    a = engine.run_batch([request(seed=5)])[0].images[0]
    b = engine.run_batch([request(seed=5)])[0].images[0]
    c = engine.run_batch([request(seed=6)])[0].images[0]
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.01


def test_batch_key_separates_what_cannot_share_a_batch(engine):
    base = engine.batch_key(request())
    assert engine.batch_key(request(prompt="another prompt", seed=3, cfg=1.0)) == base
    assert engine.batch_key(request(width=128)) != base
    assert engine.batch_key(request(num_inference_steps=4)) != base
    assert engine.batch_key(request(cfg=4.0)) != base
    assert engine.batch_key(request(images=(IMAGE_A,))) != base
    with pytest.raises(ValueError, match="one batch key"):
        engine.run_batch([request(), request(width=128)])


def test_output_size_is_rounded_to_what_the_model_needs(engine):
    result = engine.run_batch([request(width=100, height=70, num_inference_steps=1)])[0]
    assert (result.width, result.height) == (96, 64)
    assert result.images[0].shape == (64, 96, 3)


def test_progress_is_reported_for_every_step_of_every_request(engine):
    seen: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    first = request(progress=lambda step, total: seen["a"].append((step, total)))
    second = request(seed=8, progress=lambda step, total: seen["b"].append((step, total)))
    engine.run_batch([first, second])
    assert seen["a"] == seen["b"] == [(1, 3), (2, 3), (3, 3)]


def test_pad_and_stack_masks_only_when_lengths_differ():
    short, long = torch.ones(1, 3, 4), torch.ones(1, 5, 4)
    stacked, mask = pad_and_stack([short, long], [2, 1])
    assert stacked.shape == (3, 5, 4)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert torch.all(stacked[0, 3:] == 0)
    _, no_mask = pad_and_stack([short, short], [1, 1])
    assert no_mask is None


def test_cfg_as_one_batched_forward_matches_two_passes(tiny_settings, base_holder, engine):
    import dataclasses

    from qwen_edit_worker.engine.edit_engine import EditEngine

    joint = EditEngine(dataclasses.replace(tiny_settings, batch_cfg=True), base_holder.get)
    edits = [request(cfg=4.0, negative_prompt="blurry, low quality, distorted"), request(prompt="b", seed=3, cfg=2.5)]
    for together, apart in zip(joint.run_batch(edits), engine.run_batch(edits), strict=True):
        assert np.abs(together.images[0] - apart.images[0]).max() < TOLERANCE


def test_backends_that_cannot_mask_padding_never_batch_unequal_texts(tiny_env, base_holder):
    from qwen_edit_worker.engine.edit_engine import EditEngine

    flash = EditEngine(Settings.from_env(tiny_env(ATTENTION_BACKEND="flash")), base_holder.get)
    native = EditEngine(Settings.from_env(tiny_env(ATTENTION_BACKEND="native")), base_holder.get)
    short, long_ = request(prompt="blue"), request(prompt="make the whole sky a deep shade of blue")
    assert native.batch_key(short) == native.batch_key(long_)  # padded and masked: may share a batch
    assert flash.batch_key(short) != flash.batch_key(long_)
    assert flash.batch_key(short) == flash.batch_key(request(prompt="blue", seed=99))  # same text: batched
    # Same output and reference sizes, but condition images of other sizes: other vision-token counts.
    wide = request(images=(random_image(40, 48, seed=3), IMAGE_B))  # 64x64 reference either way
    assert native.batch_key(wide) == native.batch_key(request())
    assert flash.batch_key(wide) != flash.batch_key(request())


def test_cfg_batching_needs_a_backend_that_masks(tiny_env):
    with pytest.raises(ConfigError, match="CFG_BATCHING=true pads the negative prompt .* ATTENTION_BACKEND=sage_varlen"):
        Settings.from_env(tiny_env(ATTENTION_BACKEND="sage_varlen", CFG_BATCHING="true"))
    assert Settings.from_env(tiny_env(ATTENTION_BACKEND="_native_cudnn", CFG_BATCHING="true")).batch_cfg


def test_guidance_keeps_the_scale_in_float32_with_bf16_predictions():
    from qwen_edit_worker.engine.edit_engine import apply_guidance

    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 6, 8, generator=generator).to(torch.bfloat16)
    uncond = torch.randn(1, 6, 8, generator=generator).to(torch.bfloat16)
    scale = torch.tensor([3.7]).view(-1, 1, 1)
    c, u = cond.double(), uncond.double()
    combined = u + 3.7 * (c - u)
    expected = combined * (c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    got = apply_guidance(cond, uncond, scale)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)
    # What a bf16 scale gives (3.703125): off by more than the tolerance above.
    rounded = apply_guidance(cond, uncond, scale.to(torch.bfloat16).float())
    assert not torch.allclose(rounded.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("width", "height", "expected"), [
    (128, None, (128, 96)),   # a 4:3 input: the height follows
    (None, 96, (128, 96)),    # the width follows
    (2048, None, (2048, 1536)),
    (None, 2048, (2048, 2048)),  # 2730 would pass 2048: the derived side is kept within the limit
    (64, 64, (64, 64)),       # both given: as asked
])  # fmt: skip
def test_one_side_given_the_other_follows_the_inputs_aspect_ratio(engine, width, height, expected):
    edit = request(images=(IMAGE_B, random_image(400, 300, seed=4)), width=width, height=height)
    assert engine.output_size(edit) == expected


@pytest.mark.parametrize("shape", [(16384, 64), (64, 16384), (4, 2304), (2304, 4), (3000, 200)])
@pytest.mark.parametrize("given", [{}, {"width": 2048}, {"height": 64}, {"width": 64}])
def test_any_input_shape_plans_sides_within_limits(engine, shape, given):
    plan = engine.plan(request(images=(random_image(*shape, seed=5),), **{"width": None, "height": None, **given}))
    assert 64 <= plan.width <= 2048 and 64 <= plan.height <= 2048
    assert all(side >= 32 for size in plan.reference_sizes for side in size)


def test_a_sliver_of_an_image_is_edited(engine):
    # 1:100, the most images.py accepts: calculate_dimensions rounds its 64²-area reference width to 0.
    result = engine.run_batch([request(images=(random_image(24, 2400, seed=6),), width=None, height=None,
                                       num_inference_steps=1)])[0]  # fmt: skip
    assert (result.width, result.height) == (64, 640) and np.isfinite(result.images[0]).all()


def _encoding_threads(monkeypatch, pipe) -> list[str]:
    names: list[str] = []
    original = pipe.encode_prompt

    def recorded(*args, **kwargs):
        names.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", recorded)
    return names


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_prompts_encoded_ahead_give_the_same_pixels_off_the_gpu_thread(engine, base_holder, monkeypatch, cfg):
    threads = _encoding_threads(monkeypatch, base_holder.get().pipe)
    edit = request(cfg=cfg, negative_prompt="blurry")
    inline = engine.run_batch([edit])[0].images[0]
    assert threads == ["MainThread"] * (2 if cfg > 1 else 1)
    ahead = engine.encode_ahead(edit)
    assert ahead.prompts is not None and ahead == edit  # the same request as far as batching goes
    ahead.prompts.result(30)
    assert all(name.startswith("prompt-encoder") for name in threads[len(threads) // 2 :])
    threads.clear()
    assert np.array_equal(engine.run_batch([ahead])[0].images[0], inline)
    assert threads == []  # the batch used the embeddings made ahead


def test_references_are_vae_encoded_while_the_prompt_is_still_being_encoded(engine, base_holder):
    """The encode stage queues the VAE's work before it waits for prompt embeddings made ahead,
    so that the two overlap: here the embeddings only become ready once the VAE's encoder runs."""
    from concurrent.futures import Future

    pipe = base_holder.get().pipe
    edit = request()
    inline = engine.run_batch([edit])[0].images[0]
    with torch.inference_mode():
        made = engine._encode_prompts(pipe, edit, torch.device("cpu"))
    pending: Future = Future()

    def ready(*_) -> None:
        if not pending.done():
            pending.set_result(made)

    hook = pipe.vae.encoder.register_forward_pre_hook(ready)
    results: list = []
    batch = threading.Thread(target=lambda: results.append(engine.run_batch([dataclasses.replace(edit, prompts=pending)])))
    try:
        batch.start()
        batch.join(20)
        ended_by_itself = not batch.is_alive()
    finally:
        hook.remove()
        if not pending.done():  # the batch waits for the embeddings before the VAE: let it end
            pending.set_result(made)
        batch.join(60)
    assert ended_by_itself, "the batch waited for the prompt embeddings before VAE-encoding the references"
    assert np.array_equal(results[0][0].images[0], inline)


def test_a_service_job_has_its_prompt_encoded_ahead(tiny_settings, base_holder, monkeypatch):
    import asyncio

    from qwen_edit_worker.service import EditService
    from tests.test_handler import SAMPLE

    threads = _encoding_threads(monkeypatch, base_holder.get().pipe)

    async def scenario():
        service = EditService(tiny_settings, holder=base_holder)
        answer = await service.handle({"id": "j", "input": {"prompt": "x", "image_base64": SAMPLE, "num_inference_steps": 1}})
        service.batcher.close(5)
        return answer

    assert "output_image_base64" in asyncio.run(scenario())
    assert threads and all(name.startswith("prompt-encoder") for name in threads)


def test_offloaded_models_encode_on_the_gpu_thread(tiny_settings, base_holder):
    import dataclasses

    from qwen_edit_worker.engine.edit_engine import EditEngine

    offloaded = dataclasses.replace(base_holder.get(), offload="model")
    edit = request()
    assert EditEngine(tiny_settings, lambda: offloaded).encode_ahead(edit).prompts is None
