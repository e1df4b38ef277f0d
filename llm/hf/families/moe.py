"""The mixture-of-experts families: Mixtral (`mixtral`), Qwen3-MoE (`qwen3_moe`) and OLMoE (`olmoe`).

Our Llama-like block with `model.moe` (llm/model/moe.py) in its sparse layers: a softmax router (`gate`) over SwiGLU
experts whose tensors `save_pretrained` writes one per expert (transformers 5.x holds them fused as 3-D tensors in
memory and converts on save and load): Mixtral `block_sparse_moe.experts.<e>.w1/w3/w2` (gate/up/down), the others
`mlp.experts.<e>.gate_proj/up_proj/down_proj`. What sets them apart:
  mixtral    every layer sparse, the top-k weights always renormalised, an optional sliding window in every layer
  qwen3_moe  per-head QK-norm, norm_topk_prob, dense layers where `mlp_only_layers` says or off `decoder_sparse_step`
             (of width intermediate_size; the experts' is moe_intermediate_size)
  olmoe      the q/k norms over the whole projection (model.qk_norm_scope=projection), clip_qkv, norm_topk_prob
`output_router_logits` (transformers adds the aux loss in training) maps to model.moe.balance=aux_loss, else none;
router_aux_loss_coef to model.moe.aux_loss_coef. What none of them has (shared experts, sigmoid scores, the
aux-loss-free selection bias) is refused on export in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm.hf.families.base import LlamaLike
from llm.model import GPTConfig
from llm.model.moe import MOE_DEFAULTS

EXPERT = "{e}"  # the expert's index in a per-expert tensor name (llm/hf/convert.py stacks and splits them)


@dataclass(frozen=True)
class MoEFamily(LlamaLike):
    experts_field: tuple = ("num_experts",)  # config.json's name(s) of the number of experts

    def extra_refusal(self, cfg: GPTConfig) -> str | None:
        m = cfg.moe
        if m is None:
            return f"model.moe=null: {self.architecture} is a mixture of experts"
        why = {
            "shared_experts": (m["shared_experts"] == 0, "has no shared experts"),
            "score": (m["score"] == "softmax", "scores experts by softmax"),
            "balance": (m["balance"] != "aux_free", "has no router selection bias (aux-loss-free balancing)"),
            "norm_topk": (m["norm_topk"] or self.model_type != "mixtral", "always renormalises the top-k weights"),
            "layers": (m["layers"] is None or self.model_type == "qwen3_moe", "is sparse in every layer"),
        }
        for key, (ok, what) in why.items():
            if not ok:
                return f"model.moe.{key}={m[key]}: {self.architecture} {what}"
        return super().extra_refusal(cfg)

    def config_from_hf(self, hf: dict) -> dict:
        out = super().config_from_hf(hf)
        n_layer = out["n_layer"]
        experts = next(hf[k] for k in (*self.experts_field, "num_local_experts") if hf.get(k) is not None)
        layers = None
        if self.model_type == "qwen3_moe":
            self.check(hf, "use_sliding_window", not hf.get("use_sliding_window"), "no sliding window")
            step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
            sparse = [i for i in range(n_layer) if i not in dense and (i + 1) % step == 0]
            layers = None if len(sparse) == n_layer else sparse
        if self.model_type == "mixtral":
            self.check(hf, "router_jitter_noise", not hf.get("router_jitter_noise"), "0 only")
        out["moe"] = {
            **MOE_DEFAULTS,
            "num_experts": experts,
            "experts_per_token": hf["num_experts_per_tok"],
            "expert_hidden": hf.get("moe_intermediate_size") if self.model_type == "qwen3_moe" else None,
            "layers": layers,
            "norm_topk": self.model_type == "mixtral" or bool(hf.get("norm_topk_prob", False)),
            "balance": "aux_loss" if hf.get("output_router_logits") else "none",
            "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
            "z_loss_coef": 0.0,
        }
        if self.model_type == "olmoe":
            out.update(qk_norm_scope="projection", clip_qkv=hf.get("clip_qkv"))
        return out

    def config_to_hf(self, cfg: GPTConfig) -> dict:
        out, m = super().config_to_hf(cfg), cfg.moe
        out.update(
            {field: m["num_experts"] for field in self.experts_field},
            num_experts_per_tok=m["experts_per_token"],
            output_router_logits=m["balance"] == "aux_loss",
            router_aux_loss_coef=m["aux_loss_coef"],
        )
        if self.model_type == "mixtral":
            out["router_jitter_noise"] = 0.0
        else:
            out["norm_topk_prob"] = m["norm_topk"]
        if self.model_type == "qwen3_moe":
            dense = [i for i in range(cfg.n_layer) if not cfg.is_sparse(i)]
            out.update(moe_intermediate_size=m["expert_hidden"] or cfg.ffn_hidden, decoder_sparse_step=1)
            out.update(mlp_only_layers=dense, use_sliding_window=False)
        else:  # every layer sparse: intermediate_size is the experts' width
            out["intermediate_size"] = m["expert_hidden"] or cfg.ffn_hidden
        if self.model_type == "olmoe":
            out["clip_qkv"] = cfg.clip_qkv
        return out

    def layer_names(self, i: int) -> dict[str, str]:
        h = f"model.layers.{i}."
        moe = h + ("block_sparse_moe." if self.model_type == "mixtral" else "mlp.")
        parts = ("w1", "w3", "w2") if self.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        return {
            **super().layer_names(i),
            "mlp.router": moe + "gate",
            **{f"mlp.experts.{ours}": f"{moe}experts.{EXPERT}.{p}" for ours, p in zip(("gate", "up", "down"), parts)},
        }


MIXTRAL = MoEFamily(
    "mixtral",
    "MixtralForCausalLM",
    frees=frozenset({"moe", "sliding_window", "sliding_layers"}),
    sliding="all",
    experts_field=("num_local_experts",),
    default_theta=1e6,
)
QWEN3_MOE = MoEFamily(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    needs={"qk_norm": True},
    frees=frozenset({"moe"}),
    experts_field=("num_experts", "num_local_experts"),
)
OLMOE = MoEFamily(
    "olmoe",
    "OlmoeForCausalLM",
    needs={"qk_norm": True, "qk_norm_scope": "projection"},
    frees=frozenset({"moe", "clip_qkv"}),
    head_dim_field=False,
)
