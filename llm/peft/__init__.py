"""Parameter-efficient fine-tuning: LoRA adapters applied to a built model (`lora.py`). Depends on torch only."""

from llm.peft.lora import (
    ALL_LINEAR,
    TARGETS,
    LoRAConfig,
    LoRALinear,
    adapter_state,
    adapters_disabled,
    apply_lora,
    base_sha256,
    has_lora,
    lora_modules,
    merge_lora,
    trainable_report,
)

__all__ = [
    "ALL_LINEAR",
    "TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "adapter_state",
    "adapters_disabled",
    "apply_lora",
    "base_sha256",
    "has_lora",
    "lora_modules",
    "merge_lora",
    "trainable_report",
]
