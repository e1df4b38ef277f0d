"""LoRA (llm/peft): adapters start as the base, train alone, switch off to the base (DPO's reference), merge into
the weights within 1e-5, leave as a PEFT adapter dir that `peft` loads with the same logits; bad settings are one
line naming the key."""

from __future__ import annotations

import json

import pytest
import torch

from llm.data import PromptData, VerifiableTasks
from llm.errors import ConfigError
from llm.hf import save_hf, save_peft_dir
from llm.model import build_gpt
from llm.peft import LoRAConfig, adapters_disabled, apply_lora, lora_modules, merge_lora, trainable_report
from llm.train.grpo import GRPO, token_logps
from llm.train.objectives import DPO, sequence_logps

TINY = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32, pad_vocab_to=32)


def _adapted(config=None, **model):
    torch.manual_seed(0)
    base = build_gpt(**{**TINY, **model})
    adapted = build_gpt(**{**TINY, **model})
    adapted.load_state_dict(base.state_dict())
    apply_lora(adapted, config or LoRAConfig(rank=4, alpha=8))
    return base.eval(), adapted.eval()


def _train_adapters(model):
    """As if trained: every B non-zero (A is random from the start)."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(0, 0.05)


def test_adapters_start_as_the_base_and_only_they_train():
    base, adapted = _adapted()
    x = torch.randint(0, TINY["vocab_size"], (2, 12))
    assert torch.equal(base(x), adapted(x))  # B = 0
    report = trainable_report(adapted)
    per_layer = 4 * (32 + 64) + 4 * (32 + 32) + 2 * 4 * (32 + 128) + 4 * (128 + 32)  # qkv, proj, gate, up, down
    assert report["trainable_params"] == 2 * per_layer
    assert report["params"] == base.num_params() + 2 * per_layer
    adapted.train()
    adapted(x, labels=x).backward()
    grads = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_a", "lora_b")) for n in grads)
    assert {n.rsplit(".", 1)[-1] for n in adapted.state_dict()} >= {"weight", "lora_a", "lora_b"}
    assert "blocks.0.attn.qkv.weight" in adapted.state_dict()  # the base keeps its names


def test_merge_equals_unmerged_and_disabled_equals_base():
    base, adapted = _adapted(LoRAConfig(rank=4, alpha=16, target_modules=["qkv", "down"]))
    _train_adapters(adapted)
    x = torch.randint(0, TINY["vocab_size"], (2, 12))
    unmerged = adapted(x)
    assert (unmerged - base(x)).abs().max() > 1e-3
    with adapters_disabled(adapted):
        assert torch.equal(adapted(x), base(x))
    merged = merge_lora(adapted)(x)
    assert (merged - unmerged).abs().max() < 1e-5
    assert not lora_modules(adapted) and type(adapted.blocks[0].attn.qkv) is torch.nn.Linear


def test_dpo_reference_is_the_base_with_adapters_off():
    """Both reference modes: precomputed before training (adapters off) and live (the policy, adapters off)."""
    base, adapted = _adapted()
    _train_adapters(adapted)
    ids = torch.randint(0, TINY["vocab_size"], (4, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {
        "chosen_input_ids": ids[:2],
        "chosen_labels": labels[:2],
        "rejected_input_ids": ids[2:],
        "rejected_labels": labels[2:],
    }
    with torch.no_grad():
        want = sequence_logps(base, ids, labels)
        policy = sequence_logps(adapted, ids, labels)
    assert not torch.allclose(policy, want)

    class Pairs(list):
        def collate(self, items):
            return {k: torch.stack([item[k] for item in items]) for k in items[0] if torch.is_tensor(items[0][k])}

    pairs = Pairs({k: v[i] for k, v in batch.items()} for i in range(2))
    data = type("Data", (), {"train": pairs, "val": Pairs()})()
    precomputed = DPO(reference="precomputed")
    precomputed.setup(adapted, data)
    got = torch.tensor([[p["ref_chosen_logp"], p["ref_rejected_logp"]] for p in pairs]).t().flatten()
    assert torch.allclose(got, want, atol=1e-5)
    live = DPO(reference="live")
    live.setup(adapted, data)
    assert live.ref_model is None  # no second copy
    _, metrics = live.loss(adapted, batch)
    beta = live.beta
    assert torch.allclose(metrics["rewards/chosen"], beta * (policy[:2] - want[:2]).mean(), atol=1e-5)
    assert torch.allclose(metrics["rewards/rejected"], beta * (policy[2:] - want[2:]).mean(), atol=1e-5)


def test_grpo_kl_reference_is_the_base_with_adapters_off(tiny_tokenizer):
    rows = VerifiableTasks(tasks=["count"], num_examples=4)
    data = PromptData(tiny_tokenizer, rows, VerifiableTasks(split="heldout", tasks=["count"], num_examples=2))
    base, adapted = _adapted(vocab_size=len(tiny_tokenizer), max_seq_len=128)
    _train_adapters(adapted)
    kl = GRPO(rewards=[{"_target_": "llm.rewards.exact_match"}], group_size=2, max_new_tokens=4, beta=0.1)
    kl.setup(adapted, data.prepare())
    assert kl.ref_model is None  # no copy
    batch = kl.prepare(adapted, data.train.collate([data.train[0]]), step=0)
    with torch.no_grad():
        assert torch.allclose(batch["ref_logps"], token_logps(base, batch["input_ids"], batch["labels"]), atol=1e-6)
        assert not torch.allclose(batch["ref_logps"], token_logps(adapted, batch["input_ids"], batch["labels"]))


def test_peft_adapter_dir_loads_in_peft_with_equal_logits(tmp_path, tiny_tokenizer):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    torch.manual_seed(0)
    model = build_gpt(**{**TINY, "vocab_size": len(tiny_tokenizer)})
    save_hf(model, tiny_tokenizer, tmp_path / "base")
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    _train_adapters(model)
    written = save_peft_dir(model.eval(), tmp_path / "adapter", tmp_path / "base")
    assert sorted(written["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    x = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        theirs = loaded(input_ids=x).logits
        ours = model(x)[..., : len(tiny_tokenizer)]
    assert (theirs - ours).abs().max() < 1e-5


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"rank": 0}, "peft.rank=0"),
        ({"alpha": float("nan")}, "peft.alpha=nan"),
        ({"dropout": 1.0}, "peft.dropout=1.0"),
        ({"target_modules": ["qkv", "q_proj"]}, "peft.target_modules: unknown module name(s) ['q_proj']"),
        ({"target_modules": []}, "peft.target_modules=[]"),
    ],
)
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ConfigError) as e:
        LoRAConfig(**settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_target_the_model_lacks_is_named():
    model = build_gpt(**{**TINY, "mlp": "gelu"})
    with pytest.raises(ConfigError, match=r"peft.target_modules: \['gate'\] not in this model"):
        apply_lora(model, LoRAConfig(target_modules=["qkv", "gate"]))
    apply_lora(model, LoRAConfig())  # all-linear: every linear layer it has
    assert len(lora_modules(model)) == 2 * 4
