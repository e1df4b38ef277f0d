"""The Hugging Face families we read and write, one table row (or module) each, keyed by config.json's model_type.

Export writes a model back as the family it came from (model.family); a model built here goes out as the first
family below that represents it, so today's models stay LlamaForCausalLM / GPT2LMHeadModel.
"""

from llm.hf.families.base import LLAMA, MISTRAL, QWEN2, QWEN3, Family
from llm.hf.families.gemma import GEMMA3
from llm.hf.families.gpt2 import GPT2_FAMILY
from llm.hf.families.moe import MIXTRAL, OLMOE, QWEN3_MOE

FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (LLAMA, GPT2_FAMILY, MISTRAL, QWEN2, QWEN3, GEMMA3, QWEN3_MOE, MIXTRAL, OLMOE)
}

__all__ = ["FAMILIES", "Family"]
