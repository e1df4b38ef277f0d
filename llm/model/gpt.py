"""A decoder-only GPT, readable top to bottom: norms, attention, MLP, block, model (the config, every choice below,
is `config.py`; the attention kernel and its masks `attention.py`; generation with a KV cache `generation.py`).

Shapes: B batch, T sequence length, D model width, H query heads, K key/value heads, hd head dim, V vocab (the
real tokens: the embedding and head have padded_vocab_size rows for faster matmuls, and the padded rows never enter
a softmax; logits are [B, T, V]).
Choices per config: positions RoPE or learned absolute; LayerNorm or RMSNorm (pre-norm, optionally post-norm too);
MLP GELU, SwiGLU or GeGLU, or in some layers a mixture of SwiGLU experts (`moe.py`); grouped-query attention,
optionally with QK-norm (per head, or over the whole projection) and q/k/v clipping, a sliding window per layer, its
own head width and scale; LM head tied to the token embedding (or its own matrix, as some pretrained models have).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.errors import ConfigError
from llm.model.attention import causal_mask, sliding_mask
from llm.model.config import GPTConfig, gpt_config
from llm.model.fused_loss import linear_cross_entropy, logits_cross_entropy
from llm.model.generation import KVCache, stream
from llm.model.moe import MoE, idle_params
from llm.model.rope import RotaryEmbedding, apply_rotary


class UnitOffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as w (initialised 0) and applied as 1 + w, in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def make_norm(cfg: GPTConfig, dim: int | None = None) -> nn.Module:
    """The model's norm over `dim` features (default d_model)."""
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return UnitOffsetRMSNorm(dim, cfg.norm_eps) if cfg.norm_unit_offset else nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_projection = True
        self.dropout = cfg.dropout
        self.whole = cfg.qk_norm_scope == "projection"  # OLMoE: one norm over all heads' queries, one over keys
        if cfg.qk_norm:  # norm of queries and keys before RoPE (OLMo 2, Qwen 3, Gemma 3, OLMoE): bounded logits
            q_dim, k_dim = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim) if self.whole else (None, None)
            self.q_norm, self.k_norm = make_norm(cfg, q_dim or cfg.head_dim), make_norm(cfg, k_dim or cfg.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.clip = cfg.clip_qkv
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5  # None: hd^-1/2

    def forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        if self.whole:
            q, k = self.q_norm(q), self.k_norm(k)  # over H hd and K hd, per position
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, hd]
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, hd]
        if self.q_norm is not None and not self.whole:
            q, k = self.q_norm(q), self.k_norm(k)  # over hd, per head and position
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer, k, v)  # [B, K, past+T, hd]
        if attn_mask is None and past > 0 and T > 1:  # causal mask aligned to the end of the keys
            attn_mask = causal_mask(T, past, x.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and past == 0,
            scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # [B, H, T, hd] -> [B, T, D]


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        # SwiGLU's gate and up are two matmuls, not one of twice the width: measured faster on CPU (narrower
        # outputs, and backward needs no concatenation of the two gradients)
        gated = cfg.mlp in ("swiglu", "geglu")
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias) if gated else None
        self.up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)
        self.down.is_residual_projection = True
        self.gelu_gate = cfg.mlp == "geglu"  # Gemma: GELU (tanh) instead of SiLU on the gate

    def forward(self, x):  # [B, T, D] -> [B, T, F] -> [B, T, D]
        if self.gelu_gate:
            return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), CausalSelfAttention(cfg, layer)
        self.sparse = cfg.is_sparse(layer)  # a mixture of experts (model.moe) in place of the MLP
        self.norm2 = make_norm(cfg)
        self.mlp = MoE(cfg.d_model, cfg.ffn_hidden, cfg.moe) if self.sparse else MLP(cfg)
        # Gemma 2/3 ("sandwich"): the attention and MLP outputs are normed too, before the residual add
        self.post_attn_norm = make_norm(cfg) if cfg.post_norms else None
        self.post_mlp_norm = make_norm(cfg) if cfg.post_norms else None
        self.drop = nn.Dropout(cfg.dropout)
        self.activation_checkpointing = False  # set by llm.dist.parallel.parallelize

    def _forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache=None):
        h = self.attn(self.norm1(x), cos, sin, attn_mask, kv_cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + self.drop(h)
        h = self.mlp(self.norm2(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + self.drop(h)

    def forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache=None):
        if self.activation_checkpointing and self.training and kv_cache is None:
            out = checkpoint(self._forward, x, cos, sin, attn_mask, use_reentrant=False)
        else:
            out = self._forward(x, cos, sin, attn_mask, kv_cache)
        if self.sparse and self.training and torch.is_grad_enabled():  # here, not again when checkpointing recomputes
            self.mlp.record_load()
        return out


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.pos_emb == "rope" else None
        # Gemma 3: the sliding-window layers rotate with their own base, unscaled
        self.local_rope = RotaryEmbedding(cfg.head_dim, cfg.local_rope_theta) if cfg.local_rope_theta else None
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
            elif hasattr(module, "init_weights"):  # the MoE's router and stacked experts
                module.init_weights(std, 1 / math.sqrt(2 * self.config.n_layer))
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, UnitOffsetRMSNorm)):
                module.reset_parameters()
        for rope in (self.rope, self.local_rope):
            if rope is not None and rope.inv_freq.device.type != "meta":
                rope.reset_parameters()

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
        z_loss: float = 0.0,
    ):
        """input_ids [B, T] -> logits [B, T, V] over the real vocabulary (V = config.vocab_size; the embedding's
        padded rows never take part in a softmax).

        With labels [B, T] (-100 = no loss) it returns the fp32 negative log-likelihood instead of logits, through
        the fused head + cross-entropy of `fused_loss.py` (full logits never exist): summed to a scalar
        (reduction="sum") or per token [B, T] (reduction="none"). z_loss > 0 (reduction="sum"): the triple
        (NLL + z_loss x Σ lse^2, NLL, Σ lse^2) over the labelled tokens, the last two detached (`fused_loss.py`).
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
        if self.config.scale_embeddings:  # Gemma: x sqrt(D), rounded to the weights' dtype as HF does
            x = x * torch.tensor(self.config.d_model**0.5).to(x.dtype)
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
        local = self._local_layers(position_ids, past, T, attn_mask, x, seq_len, (cos, sin))
        for i, block in enumerate(self.blocks):
            layer_cos, layer_sin, layer_mask = local if self.config.is_sliding(i) else (cos, sin, attn_mask)
            x = block(x, layer_cos, layer_sin, layer_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.norm_f(x)  # [B, T, D]
        # the head has padded_vocab_size rows (matmul-friendly); only the first vocab_size are tokens, and only
        # they enter a softmax: the padded rows' logits are dropped (or masked inside the fused loss)
        V, cap = self.config.vocab_size, self.config.logit_softcap
        if labels is not None and cap is None:  # NLL: scalar, or [B, T]
            return linear_cross_entropy(x, self.lm_head.weight, labels, reduction, loss_chunk_size, z_loss, V)
        logits = self.lm_head(x)[..., :V]  # [B, T, V]
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        if labels is not None:  # soft-capped logits: the plain loss over full logits
            return logits_cross_entropy(logits, labels, reduction, z_loss)
        return logits

    def _local_layers(self, position_ids, past, T, attn_mask, x, seq_len, rope):
        """(cos, sin, mask) of the sliding-window layers: the band mask once the text is longer than the window,
        and their own RoPE when they have one; None when no layer slides."""
        if self.config.sliding_window is None:
            return None
        mask = attn_mask
        if past + T > self.config.sliding_window:
            mask = sliding_mask(T, past, self.config.sliding_window, attn_mask, x.device)
        if self.local_rope is not None:
            rope = self.local_rope(position_ids, x.dtype, seq_len)
        return (*rope, mask)

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
        num_samples: int = 1,
    ):
        """Sample continuations of input_ids [B, T0] -> [B x num_samples, T0 + n]; temperature 0 means greedy.

        Stops early once every row has produced eos_token_id (a finished row gets eos_token_id after its stop).
        With use_cache the prompt is processed once and every later step feeds one token against a preallocated KV
        cache. attention_mask [B, T0] (1 = token, 0 = padding on the left) lets prompts of different lengths share
        a batch: no token attends to padding, and each row's positions count from its own first token.
        num_samples > 1: each prompt is read once and continued as that many samples (adjacent rows).
        """
        new = self.stream(
            input_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            use_cache,
            generator,
            attention_mask,
            num_samples,
        )
        return torch.cat([input_ids.repeat_interleave(num_samples, dim=0), *new], dim=1)

    def stream(self, input_ids, max_new_tokens: int, *args, **kwargs):
        """`generate` one step at a time: yields each step's new tokens [B, 1] (see `generation.stream`)."""
        return stream(self, input_ids, max_new_tokens, *args, **kwargs)


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> int:
    """Training FLOPs per token, for MFU: 6N for the matmuls forward and backward (N without a learned position
    table, which is a lookup, and without the experts a token skips in a mixture of experts) plus 12 L (H hd) T for
    the attention scores and values (T at most the window in sliding-window layers)."""
    pos_params = cfg.max_seq_len * cfg.d_model if cfg.pos_emb == "learned" else 0
    pos_params += idle_params(cfg.moe, cfg.n_layer, cfg.d_model, cfg.ffn_hidden)
    keys = sum(min(seq_len, cfg.sliding_window) if cfg.is_sliding(i) else seq_len for i in range(cfg.n_layer))
    return 6 * (n_params - pos_params) + 12 * cfg.n_head * cfg.head_dim * keys


def build_gpt(**kwargs) -> GPT:
    """Build a GPT from plain keyword arguments (what `conf/model/*.yaml` holds plus vocab_size, rope_scaling)."""
    return GPT(gpt_config(**kwargs))
