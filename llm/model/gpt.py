"""A decoder-only GPT, readable top to bottom: attention, MLP, block, model, generation with a KV cache (the
config, every choice below, is `config.py`).

Shapes: B batch, T sequence length, D model width, H query heads, K key/value heads, hd head dim, V vocab.
Choices per config: positions RoPE or learned absolute; LayerNorm or RMSNorm (pre-norm); MLP GELU or SwiGLU;
grouped-query attention through `scaled_dot_product_attention`; LM head tied to the token embedding (or its own
matrix, as some pretrained models have); optionally per-head RMSNorm on queries and keys (QK-norm).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.errors import ConfigError
from llm.model.config import GPTConfig, gpt_config
from llm.model.fused_loss import linear_cross_entropy
from llm.model.rope import RotaryEmbedding, apply_rotary
from llm.model.sampling import left_padding_inputs, sample_next_token


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_projection = True
        self.dropout = cfg.dropout
        if cfg.qk_norm:  # per-head RMSNorm of queries and keys before RoPE (OLMo 2, Qwen 3): bounded logits
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache: KVCache | None = None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, hd]
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over hd, per head and position
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer, k, v)  # [B, K, past+T, hd]
        if attn_mask is None and past > 0 and T > 1:  # causal mask aligned to the end of the keys
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and past == 0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        # SwiGLU's gate and up are two matmuls, not one of twice the width: measured faster on CPU (narrower
        # outputs, and backward needs no concatenation of the two gradients)
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)
        self.down.is_residual_projection = True

    def forward(self, x):  # [B, T, D] -> [B, T, F] -> [B, T, D]
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), CausalSelfAttention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.activation_checkpointing = False  # set by llm.train.parallel.parallelize

    def _forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache=None):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, attn_mask, kv_cache))
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache=None):
        if self.activation_checkpointing and self.training and kv_cache is None:
            return checkpoint(self._forward, x, cos, sin, attn_mask, use_reentrant=False)
        return self._forward(x, cos, sin, attn_mask, kv_cache)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.pos_emb == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layer); norms to 1, biases to 0."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if getattr(module, "is_residual_projection", 0) else 1
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        if self.rope is not None and self.rope.inv_freq.device.type != "meta":
            self.rope.reset_parameters()

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the embedding (and an untied LM head) to `vocab_size` tokens, e.g. after adding chat tokens to a
        tokenizer. Existing rows are kept; new rows (if the padded size grows) are initialised like the embedding."""
        if vocab_size < self.config.vocab_size:
            raise ConfigError(f"cannot shrink the vocabulary from {self.config.vocab_size} to {vocab_size}")
        old, old_head = self.tok_emb.weight, self.lm_head.weight
        self.config.vocab_size = vocab_size
        if self.config.padded_vocab_size != old.size(0):
            emb = nn.Embedding(self.config.padded_vocab_size, self.config.d_model, device=old.device, dtype=old.dtype)
            nn.init.normal_(emb.weight, 0.0, self.config.init_std)
            emb.weight[: old.size(0)] = old
            self.tok_emb = emb
            self.lm_head = nn.Linear(
                self.config.d_model, self.config.padded_vocab_size, bias=False, device=old.device, dtype=old.dtype
            )
            if self.config.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
            else:
                nn.init.normal_(self.lm_head.weight, 0.0, self.config.init_std)
                self.lm_head.weight[: old_head.size(0)] = old_head

    def num_params(self) -> int:
        """Number of unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids,
        position_ids=None,
        attn_mask=None,
        kv_cache: KVCache | None = None,
        labels=None,
        reduction: str = "sum",
        loss_chunk_size: int = 0,
    ):
        """input_ids [B, T] -> logits [B, T, V_padded].

        With labels [B, T] (-100 = no loss) it returns the fp32 negative log-likelihood instead of logits, through
        the fused head + cross-entropy of `fused_loss.py` (full logits never exist): summed to a scalar
        (reduction="sum") or per token [B, T] (reduction="none").
        position_ids [B, T] (optional) restart positions for packed sequences; attn_mask (optional) is a bool
        [B, 1, T, T_keys] mask, True where attention is allowed; without it attention is causal.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        seq_len = None  # max position + 1 when known on the host (dynamic NTK then needs no look at position_ids)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)  # [T]
            seq_len = past + T
        x = self.tok_emb(input_ids)  # [B, T, D]
        cos = sin = None
        if self.pos_emb is not None:
            last = past + T if position_ids.dim() == 1 else int(position_ids.max()) + 1
            if last > self.config.max_seq_len:
                raise ConfigError(
                    f"sequence of {last} positions exceeds the learned position table of "
                    f"model.max_seq_len={self.config.max_seq_len} (learned positions cannot extrapolate; use RoPE)"
                )
            x = x + self.pos_emb(position_ids)
        else:
            cos, sin = self.rope(position_ids, x.dtype, seq_len)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.norm_f(x)  # [B, T, D]
        if labels is not None:  # NLL: scalar, or [B, T]
            return linear_cross_entropy(x, self.lm_head.weight, labels, reduction, loss_chunk_size)
        return self.lm_head(x)

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        """Sample continuations of input_ids [B, T0] -> [B, T0 + n]; temperature 0 means greedy.

        Stops early once every row has produced eos_token_id (a finished row gets eos_token_id after its stop).
        With use_cache the prompt is processed once and every later step feeds one token against a preallocated KV
        cache. attention_mask [B, T0] (1 = token, 0 = padding on the left) lets prompts of different lengths share
        a batch: no token attends to padding, and each row's positions count from its own first token.
        """
        new = self.stream(
            input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, use_cache, generator, attention_mask
        )
        return torch.cat([input_ids, *new], dim=1)

    @torch.no_grad()
    def stream(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        """`generate` one step at a time: yields each step's new tokens [B, 1] (for printing as they come).

        Learned positions see at most the last max_seq_len tokens: past that the context is cropped (and the KV
        cache, whose positions would run past the table, is given up)."""
        total = input_ids.size(1) + max_new_tokens  # RoPE runs past its context (learned positions crop instead)
        if self.rope is not None and total > (limit := self.rope.context_limit(self.config.max_seq_len)):
            what = (
                "model.max_seq_len"
                if self.rope.scaling["type"] == "none"
                else "extrapolation.factor x extrapolation.original_max_position_embeddings"
            )
            warnings.warn(
                f"generating up to {total} positions, past the {limit} this model's positions are meant "
                f"for ({what}); quality may degrade",
                stacklevel=3,
            )
        window = self.config.max_seq_len if self.pos_emb is not None else total  # most positions one forward sees
        was_training = self.training
        self.eval()
        cache = None
        if use_cache:
            cache = KVCache(
                self.config, input_ids.size(0), min(total, window), input_ids.device, self.tok_emb.weight.dtype
            )
        out, step_input = input_ids, input_ids
        done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        keep = None if attention_mask is None else attention_mask.bool()  # [B, tokens so far]: False on padding
        try:
            for _ in range(max_new_tokens):
                if cache is not None and cache.length + step_input.size(1) > window:
                    cache = None  # learned positions at the end of their table: the last `window` tokens, no cache
                context = step_input if cache is not None else out[:, -window:]
                padded = {}
                if keep is not None:  # the keys so far: the cache's and the context's
                    keys = keep[:, -window:] if cache is None else keep
                    padded = dict(zip(("position_ids", "attn_mask"), left_padding_inputs(keys, context.size(1))))
                logits = self(context, kv_cache=cache, **padded)[:, -1, : self.config.vocab_size]
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
            self.train(was_training)


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> int:
    """Training FLOPs per token, for MFU: 6N for the matmuls forward and backward (N without a learned position
    table, which is a lookup) plus 12 L D T for the attention scores and values."""
    pos_params = cfg.max_seq_len * cfg.d_model if cfg.pos_emb == "learned" else 0
    return 6 * (n_params - pos_params) + 12 * cfg.n_layer * cfg.d_model * seq_len


def build_gpt(**kwargs) -> GPT:
    """Build a GPT from plain keyword arguments (what `conf/model/*.yaml` holds plus vocab_size, rope_scaling)."""
    return GPT(gpt_config(**kwargs))
