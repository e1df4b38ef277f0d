"""LoRA adapters (llm.peft) as a PEFT adapter dir: `adapter_config.json` + `adapter_model.safetensors` under the
names PEFT gives the adapters of the exported Hugging Face model, so that
`peft.PeftModel.from_pretrained(<exported base>, <adapter dir>)` computes what our adapted model does.

Our fused qkv becomes q_proj / k_proj / v_proj for the families that split it (Llama, Mistral, Qwen, Gemma): one
A shared by the three (the rank is unchanged) and B split by rows, as the weight is; GPT-2's fused c_attn (a
Conv1D) keeps qkv whole (`fan_in_fan_out`). PEFT orients A [r, in] and B [out, r] as we do, for Conv1D too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from llm.errors import ConfigError, check_choice
from llm.hf.convert import family_of, name_map
from llm.hf.files import DTYPES
from llm.peft import lora_modules

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # where PEFT's PeftModelForCausalLM keeps the wrapped model


def to_peft(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the adapters under PEFT's names, the HF module names they target)."""
    cfg, fam, names = model.config, family_of(model.config), name_map(model.config)
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    tensors, targets = {}, set()
    for ours, module in lora_modules(model).items():
        theirs = names[f"{ours}.weight"].removesuffix(".weight")
        a, b = module.lora_a.detach(), module.lora_b.detach()
        parts = [(theirs, a, b)]
        if not fam.fused_qkv and theirs.endswith(".qkv"):
            parts = [
                (theirs.replace("qkv", p), a, piece)
                for p, piece in zip(("q_proj", "k_proj", "v_proj"), b.split([q, kv, kv], dim=0))
            ]
        for name, a_part, b_part in parts:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a_part.contiguous().clone()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b_part.contiguous().clone()
            targets.add(name.rsplit(".", 1)[-1])
    return tensors, sorted(targets)


def save_peft_dir(model, out_dir: str | Path, base: str, dtype: str | None = None, key: str = "task.out_dir") -> dict:
    """Write the adapters of `model` as a PEFT adapter dir for the HF model at `base` (written into `<dir>.tmp`
    and renamed; an existing dir must be empty). Returns what was written."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(p.name != "base" for p in out.iterdir())):
        raise ConfigError(f"{key}={str(out)!r} exists and is not an empty directory (nothing is overwritten)")
    spec = model.peft_config
    dtype = dtype or str(next(iter(lora_modules(model).values())).lora_a.dtype).removeprefix("torch.")
    check_choice("task.dtype", dtype, DTYPES)
    tensors, targets = to_peft(model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": spec["rank"],
        "lora_alpha": spec["alpha"],
        "lora_dropout": spec["dropout"],
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": family_of(model.config).conv1d,  # GPT-2's Conv1D stores weights as [in, out]
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    tmp = out.with_name(out.name + ".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(
            {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"}
        )
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            f.rename(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out_dir": str(out),
        "adapter": "peft",
        "base_model": str(base),
        "target_modules": targets,
        "rank": spec["rank"],
        "dtype": dtype,
        "params": sum(t.numel() for t in tensors.values()),
        "files": sorted(p.name for p in out.iterdir()),
    }
