"""The plain Hugging Face recipe every fidelity test compares against."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from workers.config import GenerationSpec


class Reference:
    """The plain recipe: Blip2Processor + Blip2ForConditionalGeneration.generate, one image and prompt at a time."""

    def __init__(self, path, generation: GenerationSpec, device: str = "cpu", dtype=torch.float32):
        self.generation = generation
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        self.processor = Blip2Processor.from_pretrained(path)
        size = self.processor.image_processor.size
        self.height, self.width = size["height"], size["width"]

    def __call__(self, rgb: np.ndarray, prompt: str | None) -> tuple[str, list[int]]:
        inputs = self.processor(images=Image.fromarray(rgb), text=prompt, return_tensors="pt")
        inputs = inputs.to(self.model.device, self.model.dtype)  # casts pixel_values only, as the model card does
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generation.generate_kwargs())
        if self.model.config.is_encoder_decoder:
            new = out[0, 1:]  # after the decoder start token
        else:
            # Decoder-only generate returns the prompt too (image tokens + prompt tokens).
            q = self.model.config.num_query_tokens
            prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else q + 1
            assert out[0, :q].tolist() == [self.model.config.image_token_index] * q
            new = out[0, prompt_len:]
            if prompt:
                full = self.processor.batch_decode(out, skip_special_tokens=True)[0]
                assert full.startswith(prompt)  # the plain recipe's text includes the prompt
        text = self.processor.batch_decode(new[None], skip_special_tokens=True)[0].strip()
        return text, new.tolist()
