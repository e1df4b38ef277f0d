"""Generation for `gpt.GPT`: the preallocated KV cache and the decoding loop (batched, with left padding).

The loop feeds the prompt once, then one token per step against the cache; learned positions at the end of their
table fall back to a cropped context without a cache. Sliding-max_context layers keep every position in the cache and
mask the old ones (the model builds those masks), so the cache is as long as the text.
"""

from __future__ import annotations

import warnings

import torch

from llm.model.config import GPTConfig
from llm.model.sampling import left_padding_inputs, sample_next_token


class KVCache:
    """Preallocated keys/values for every layer: k, v [n_layer, B, K, max_len, hd]; `length` positions filled."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already written (the same for every layer after a full forward)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, hd] after the cached positions; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.k.size(3):
            raise ValueError(f"KV cache of {self.k.size(3)} positions is full")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_rows(self, n: int) -> None:
        """Each row's keys/values become n adjacent rows (a prompt read once, continued as n samples)."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)


@torch.no_grad()
def stream(
    model,
    input_ids,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    num_samples: int = 1,
):
    """`GPT.stream`: yields each step's new tokens [B x num_samples, 1] (for printing as they come).
    attention_mask [B, T0] (1 = token, 0 = padding on the left) and num_samples: see `GPT.generate`.

    Learned positions see at most the last max_seq_len tokens: past that the context is cropped (and the KV
    cache, whose positions would run past the table, is given up)."""
    total = input_ids.size(1) + max_new_tokens  # RoPE runs past its context (learned positions crop instead)
    if model.rope is not None and total > (limit := model.rope.context_limit(model.config.max_seq_len)):
        what = (
            "model.max_seq_len"
            if model.rope.scaling["type"] == "none"
            else "extrapolation.factor x extrapolation.original_max_position_embeddings"
        )
        warnings.warn(
            f"generating up to {total} positions, past the {limit} this model's positions are meant "
            f"for ({what}); quality may degrade",
            stacklevel=3,
        )
    max_context = model.config.max_seq_len if model.pos_emb is not None else total  # most positions one forward sees
    was_training = model.training
    model.eval()
    cache = None
    if use_cache:
        cache = KVCache(
            model.config, input_ids.size(0), min(total, max_context), input_ids.device, model.tok_emb.weight.dtype
        )
    out, step_input = input_ids, input_ids
    done = torch.zeros(input_ids.size(0) * num_samples, dtype=torch.bool, device=input_ids.device)
    keep = None if attention_mask is None else attention_mask.bool()  # [B, tokens so far]: False on padding
    try:
        for _ in range(max_new_tokens):
            if cache is not None and cache.length + step_input.size(1) > max_context:
                cache = None  # learned positions at the end of their table: the last `max_context` tokens, no cache
            context = step_input if cache is not None else out[:, -max_context:]
            padded = {}
            if keep is not None:  # the keys so far: the cache's and the context's
                keys = keep[:, -max_context:] if cache is None else keep
                padded = dict(zip(("position_ids", "attn_mask"), left_padding_inputs(keys, context.size(1))))
            logits = model(context, kv_cache=cache, **padded)[:, -1]  # [B, V]
            if num_samples > 1 and out is input_ids:  # the prompts were read once: now num_samples rows each
                logits, out = logits.repeat_interleave(num_samples, 0), out.repeat_interleave(num_samples, 0)
                keep = keep.repeat_interleave(num_samples, 0) if keep is not None else None
                if cache is not None:
                    cache.repeat_rows(num_samples)
            next_token = sample_next_token(logits.float(), temperature, top_k, top_p, generator)  # [B, 1]
            if eos_token_id is not None:
                next_token = torch.where(done[:, None], torch.full_like(next_token, eos_token_id), next_token)
                done |= next_token[:, 0] == eos_token_id
            out = torch.cat([out, next_token], dim=1)
            if keep is not None:
                keep = torch.cat([keep, torch.ones_like(next_token, dtype=torch.bool)], dim=1)
            step_input = next_token
            yield next_token
            if eos_token_id is not None and bool(done.all()):
                break
    finally:  # also when the caller stops reading early
        model.train(was_training)
