"""Batched sampling of completions for prompts of different lengths: one left-padded batch through the model's
KV-cache generation (`GPT.generate` with an attention mask), each row stopping at the chat template's stop token.

Used by task=grpo (G completions per prompt, every step, and greedy replies to held-out prompts) and by the
generation benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.model import unwrap_model


@dataclass
class Completions:
    ids: list[list[int]]  # each completion's tokens, through its stop token when it produced one
    finished: list[bool]  # it ended with the stop token (False: cut at max_new_tokens)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids [B, T] padded on the left with pad_id, attention_mask [B, T] (0 on padding)."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


@torch.no_grad()
def sample_completions(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_id: int,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    samples: int = 1,
) -> Completions:
    """`samples` completions of each prompt (adjacent), in order; temperature 0 is greedy. Each prompt is read
    once and its KV cache shared by its samples. `batch_size`: at most this many prompts per generate call (None:
    all at once)."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    step = batch_size or len(prompts)
    ids, finished = [], []
    for start in range(0, len(prompts), step):
        x, mask = left_pad(prompts[start : start + step], pad_id, device)
        out = model.generate(
            x,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            stop_id,
            generator=generator,
            attention_mask=mask,
            num_samples=samples,
        )
        for row in out[:, x.size(1) :].tolist():
            end = row.index(stop_id) + 1 if stop_id in row else len(row)
            ids.append(row[:end])
            finished.append(stop_id in row)
    return Completions(ids, finished)
