"""The job input contract: what is accepted, and the one sentence for what is not."""

from __future__ import annotations

import pytest

from config import Settings
from qwen_edit_worker.jobs.schema import FIELD_RULES, MAX_SEED, InputError, parse, resolve_seed

SETTINGS = Settings.from_env({"MAX_INPUT_IMAGES": "3"})
URL = "https://example.com/a.png"


def ok(**fields):
    return parse({"prompt": "make it blue", "image_url": URL, **fields}, SETTINGS)


def refused(job_input) -> str:
    with pytest.raises(InputError) as caught:
        parse(job_input, SETTINGS)
    return str(caught.value)


def test_a_full_valid_input_is_accepted():
    params = ok(
        negative_prompt="blurry", num_inference_steps=8, true_cfg_scale=4, seed=MAX_SEED, width=1024,
        height=768, num_images=4, output_format="webp", output_quality=80, images=["aGVsbG8=", "data:image/png;base64,aGk="],
    )
    assert params.true_cfg_scale == 4.0 and params.seed == MAX_SEED
    assert params.image_sources() == [URL, "aGVsbG8=", "data:image/png;base64,aGk="]


def test_defaults():
    params = ok()
    assert (params.num_images, params.output_format, params.output_quality) == (1, "png", 95)
    assert params.seed is None and params.num_inference_steps is None and params.true_cfg_scale is None


def test_seed_is_random_when_absent_and_kept_when_given():
    assert resolve_seed(ok(seed=0)) == 0
    seeds = {resolve_seed(ok()) for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s <= MAX_SEED for s in seeds)


@pytest.mark.parametrize("job_input", [None, "make it blue", ["prompt"], 42])
def test_input_that_is_not_an_object(job_input):
    assert refused(job_input) == "'input' must be a JSON object with a 'prompt' and at least one image."


def test_unknown_field_is_refused_with_the_allowed_ones():
    message = refused({"promt": "x", "image_url": URL})
    assert message.startswith("Unknown input field 'promt'") and "prompt, image_url" in message


def test_missing_prompt():
    assert refused({"image_url": URL}) == f"Input field 'prompt' is required: it must be {FIELD_RULES['prompt']}."


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt", ""), ("prompt", "x" * 4001), ("prompt", 5), ("num_inference_steps", 0),
        ("num_inference_steps", 101), ("num_inference_steps", "8"), ("num_inference_steps", 8.5),
        ("true_cfg_scale", -1), ("true_cfg_scale", 21), ("true_cfg_scale", True), ("seed", -1),
        ("seed", MAX_SEED + 1), ("width", 63), ("height", 2049), ("num_images", 5), ("output_format", "gif"),
        ("output_quality", 0), ("negative_prompt", ["a"]), ("images", "not-a-list"), ("image_url", ""),
    ],
)  # fmt: skip
def test_bad_values_name_the_field_and_what_it_allows(field, value):
    job_input = {"prompt": "x", "image_url": URL, field: value}
    message = refused(job_input)
    assert message.startswith(f"Input field '{field}'") and FIELD_RULES[field] in message


def test_bad_list_item_is_located():
    assert refused({"prompt": "x", "images": ["aGk=", 7]}) == (
        "Input field 'images' item 1 must be an image URL, a base64 string or a data URI; got 7."
    )


@pytest.mark.parametrize("count", [0, 4])
def test_image_count_must_be_within_the_limit(count):
    job_input = {"prompt": "x"}
    if count:
        job_input["images"] = ["aGk="] * count
    assert f"from 1 to 3; got {count}" in refused(job_input)


def test_the_limit_counts_every_image_field_together():
    assert "got 4" in refused({"prompt": "x", "image_url": URL, "image_base64": "aGk=", "images": ["aGk=", "aGk="]})


def test_hostile_inputs_get_a_sentence_never_a_traceback():
    """Random JSON of every shape in every field: a valid EditInput or an InputError, nothing else."""
    import json
    import random as stdlib_random

    rng = stdlib_random.Random(1234)
    values = [None, True, False, 0, -1, 1, 2**64, 1.5, float("inf"), float("nan"), "", "x", "💥" * 5000, [], [1],
              ["a", None], {}, {"a": 1}, "http://127.0.0.1/", "data:,", "A" * 100]  # fmt: skip
    fields = [*FIELD_RULES, "promt", "__class__", "model_config", ""]
    for _ in range(2000):
        job_input = {rng.choice(fields): rng.choice(values) for _ in range(rng.randint(0, 6))}
        if rng.random() < 0.5:
            job_input["prompt"] = "x"
            job_input["image_url"] = URL
        try:
            parse(job_input, SETTINGS)
        except InputError as error:
            sentence = str(error)
            assert sentence.endswith(".") and "\n" not in sentence and "Traceback" not in sentence
            json.dumps({"error": sentence})  # it can be sent back as it is


@pytest.mark.parametrize(("field", "guess"), [
    ("image_urls", "images"), ("image", "images"), ("promt", "prompt"), ("guidance_scale", "true_cfg_scale"),
    ("num_inference_step", "num_inference_steps"), ("seeds", "seed"),
])  # fmt: skip
def test_an_unknown_field_suggests_the_closest_allowed_one(field, guess):
    message = refused({"prompt": "x", "image_url": URL, field: 1})
    assert message.startswith(f"Unknown input field '{field}' (did you mean '{guess}'?); allowed fields are prompt,")


def test_an_unknown_field_unlike_any_gets_no_guess():
    assert refused({"prompt": "x", "image_url": URL, "zzz": 1}).startswith("Unknown input field 'zzz'; allowed")


@pytest.mark.parametrize("value", ["jpg", "JPG", "Jpeg"])
def test_jpg_is_accepted_as_jpeg(value):
    assert parse({"prompt": "x", "image_url": URL, "output_format": value}, SETTINGS).output_format == "jpeg"


def test_an_unknown_format_names_the_allowed_ones():
    assert refused({"prompt": "x", "image_url": URL, "output_format": "gif"}) == (
        "Input field 'output_format' must be one of png, jpeg (or jpg), webp; got 'gif'."
    )


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|vision_start|>", "<|im_end|>", "<|endoftext|>"])
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_control_tokens_in_prompts_are_refused_in_a_sentence(field, token):
    fields = {"prompt": "x", field: f"put {token} here"}
    assert refused({**fields, "image_url": URL}) == (
        f"Input field '{field}' contains {token}, one of the model's control tokens; prompts are plain text, remove it."
    )


def test_text_that_only_looks_like_markup_is_kept():
    assert parse({"prompt": "a <b> tag, |pipes| and <|not a token", "image_url": URL}, SETTINGS).prompt.startswith("a <b>")


def test_a_lone_surrogate_is_named_as_such():
    import json

    assert refused({"prompt": json.loads('"sky \\ud800"'), "image_url": URL}) == (
        "Input field 'prompt' is not valid Unicode text (it holds a lone surrogate escape); send UTF-8 text."
    )


def test_loras_on_an_endpoint_that_takes_none_and_a_weight_name_beside_a_url_are_refused_in_a_sentence():
    from dataclasses import replace

    none_taken = replace(SETTINGS, max_loras=0)
    with pytest.raises(InputError) as caught:
        parse({"prompt": "p", "image_url": URL, "loras": [{"path": "owner/name"}]}, none_taken)
    assert str(caught.value) == "Input field 'loras' is not taken by this endpoint (MAX_LORAS=0); send no loras."
    lora = {"path": "https://example.com/style.safetensors", "weight_name": "other.safetensors"}
    assert refused({"prompt": "p", "image_url": URL, "loras": [lora]}) == (
        "Input field 'loras[0].weight_name' picks a file in a Hugging Face repo; a URL names its file itself: send "
        "weight_name only with a repo id.")  # fmt: skip
