"""Exact match: greedy replies to held-out prompts compared with the reference answers (whitespace-trimmed).

Prompts of equal token length are generated together as one batch, so no padding (and no attention mask) is
needed; a reply ends at the chat template's stop token.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from llm.data.chat import encode_chat, stop_token_id
from llm.model import unwrap_model


@torch.no_grad()
def generate_replies(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Greedy assistant replies to each prompt (a message list), in order."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    stop = stop_token_id(tokenizer)
    encoded = [encode_chat(tokenizer, p, add_generation_prompt=True)[0] for p in prompts]
    by_length = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    replies: list[str] = [""] * len(prompts)
    for length, idx in by_length.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            x = torch.tensor([encoded[i] for i in chunk], device=device)
            out = model.generate(x, max_new_tokens, temperature=0, eos_token_id=stop)[:, length:].tolist()
            for i, ids in zip(chunk, out):
                ids = ids[: ids.index(stop)] if stop in ids else ids
                replies[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return replies


def exact_match(model, tokenizer, examples: list[tuple[list[dict], str]], max_new_tokens: int = 32) -> float:
    """Share of examples (prompt messages, reference) whose greedy reply equals the reference."""
    if not examples:
        return float("nan")
    replies = generate_replies(model, tokenizer, [p for p, _ in examples], max_new_tokens)
    return sum(r.strip() == ref.strip() for r, (_, ref) in zip(replies, examples)) / len(examples)
