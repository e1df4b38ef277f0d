"""The sample a run prints and saves at its end (`task.sample.*`): a completion of a prompt, or with `chat` the
assistant's reply to the prompt as a user turn of the chat template."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from llm.data.chat import encode_chat, stop_token_id
from llm.errors import ConfigError, check_bool, check_int, check_number
from llm.model import unwrap_model


@dataclass(frozen=True)
class SampleSettings:
    prompt: str = ""
    max_new_tokens: int = 0  # 0: no sample
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    chat: bool = False  # the prompt as a user turn; the reply ends at the end of the assistant turn

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ConfigError(f"task.sample.prompt={self.prompt!r} must be a string")
        check_int("task.sample.max_new_tokens", self.max_new_tokens, 0)
        check_number("task.sample.temperature", self.temperature, 0)  # 0: greedy
        check_int("task.sample.top_k", self.top_k, 0, allow_none=True)
        check_number("task.sample.top_p", self.top_p, 0, 1, low_open=True, allow_none=True)
        check_bool("task.sample.chat", self.chat)


@torch.no_grad()
def generate_sample(
    model, tokenizer, settings: SampleSettings | None, seed: int, autocast=contextlib.nullcontext
) -> str | None:
    """The sample text (prompt + completion, or 'prompt -> reply' with chat); None when no sample is asked for."""
    if settings is None or tokenizer is None or not settings.max_new_tokens:
        return None
    model = unwrap_model(model)
    device = next(model.parameters()).device
    prompt = settings.prompt or ""
    if settings.chat:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
        stop = stop_token_id(tokenizer)
    else:
        # an empty prompt starts a document: after EOS, the separator pretraining puts between documents
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        stop = tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast():
        out = model.generate(
            torch.tensor([ids], device=device),
            settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            eos_token_id=stop,
            generator=generator,
        )
    text = tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    return f"{prompt} -> {text}" if settings.chat else prompt + text
