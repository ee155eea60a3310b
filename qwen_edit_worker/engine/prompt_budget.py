"""How many of the transformer's text positions a request's texts take, counted before the GPU.

The transformer gives text tokens rotary positions from one table (4096 rows in diffusers),
starting after the largest image position; a text past the table's end fails inside the
forward with a tensor-size error. The text is the pipeline's template around the prompt,
with each condition image's vision tokens in it, less the system prefix the pipeline drops.
So the count runs the pipeline's own processor on the same text and condition images, on a
private copy (a fast tokenizer must not be used by two threads at once).
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

from qwen_edit_worker.engine.edit_engine import BLANK_NEGATIVE_PROMPT, EditRequest, resized_for_text_encoder

# The pipeline's own template for each input image (QwenImageEditPlusPipeline._get_qwen_prompt_embeds).
IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


class TextTooLong(ValueError):
    def __init__(self, field: str, tokens: int, limit: int):
        super().__init__(
            f"Input field '{field}' is too long: with the input images it takes {tokens} text positions of the "
            f"{limit} the model has at this output size; shorten it."
        )


class PromptBudget:
    def __init__(self, pipe_getter: Callable[[], object]):
        self._pipe = pipe_getter
        self._lock = threading.Lock()
        self._processor = None

    def check(self, request: EditRequest, width: int, height: int, reference_sizes) -> None:
        """Raise `TextTooLong` naming the first text that does not fit."""
        limit = self.limit(width, height, reference_sizes)
        texts = {"prompt": request.prompt}
        if request.do_cfg:
            texts["negative_prompt"] = request.negative_prompt or BLANK_NEGATIVE_PROMPT
        images = resized_for_text_encoder(self._pipe(), request.images)  # once for every text
        for field, text in texts.items():
            tokens = self.tokens(text, images)
            if tokens > limit:
                raise TextTooLong(field, tokens, limit)

    def limit(self, width: int, height: int, reference_sizes) -> int:
        """Rows of the rotary table left after the largest image position (as diffusers places them)."""
        pipe = self._pipe()
        rope = pipe.transformer.pos_embed
        factor = pipe.vae_scale_factor * 2  # VAE downsampling, then 2x2 patches
        grids = [(height // factor, width // factor)] + [(h // factor, w // factor) for w, h in reference_sizes]
        largest = max(max(h // 2, w // 2) if rope.scale_rope else max(h, w) for h, w in grids)
        return rope.pos_freqs.shape[0] - largest

    def tokens(self, text: str, images: list) -> int:
        """Text positions `text` takes beside `images` (already resized for the text encoder)."""
        pipe = self._pipe()
        prefix = "".join(IMAGE_PROMPT.format(k + 1) for k in range(len(images)))
        with self._lock:
            if self._processor is None:
                self._processor = copy.deepcopy(pipe.processor)
            ids = self._processor(text=[pipe.prompt_template_encode.format(prefix + text)], images=images,
                                  return_tensors="pt")["input_ids"]  # fmt: skip
        return ids.shape[1] - pipe.prompt_template_encode_start_idx
