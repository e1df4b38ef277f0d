"""One model source: `init_from` (or `python -m llm.generate`'s model) resolved once into a `ModelSource` — a
checkpoint of ours (a run dir: its newest complete checkpoint, a checkpoint dir, `latest:<task>`, `best:<task>`),
a Hugging Face model dir, or a hub name (owner/name, fetched into the local cache: then an HF model dir) — with its
path, its model config, its tokenizer and its weights. Every task and `llm.generate` load through it.

`open_source(cfg, explicit)` is the config's side: the task's need for init_from checked, the source resolved, and
its architecture written into the config's model keys (those not set on the command line) before anything
interpolates `${model.*}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf, open_dict

from llm.checkpoint.adapters import is_adapter_checkpoint, load_adapted
from llm.checkpoint.files import ARCH_KEYS, DEFAULTS, load_model_weights, read_json, resolve_checkpoint
from llm.data.tokenizer import load_pretrained
from llm.errors import ConfigError
from llm.hf import (
    fetch_hub_model,
    is_hf_model_dir,
    load_hf_tokenizer,
    load_hf_weights,
    looks_like_hub_name,
    read_hf_config,
)
from llm.model import GPT, GPTConfig
from llm.peft import merge_lora

CARRIED_KEYS = (*ARCH_KEYS, "max_seq_len", "rope_theta")  # model preset keys the source's values replace
# keys a model preset may not carry (an imported model's family options, untied head, norm eps, ...): the source's
EXTRA_KEYS = (*ARCH_KEYS, "norm_eps", "init_std", "family")


@dataclass
class ModelSource:
    path: Path  # the checkpoint dir or HF model dir itself
    hf: bool  # a Hugging Face model dir (else a checkpoint of ours)
    config: dict  # our GPTConfig keyword arguments, as the source saved them
    key: str = "init_from"  # the option errors name
    _tokenizer: object = field(default=None, repr=False, compare=False)

    @classmethod
    def resolve(cls, value, key: str = "init_from") -> ModelSource:
        """The source `value` names (see the module docstring); ConfigError / DataError naming `key` when it is
        none. An HF model dir's tokenizer is loaded here: one that does not fit fails before any work."""
        value = str(value)
        if looks_like_hub_name(value):  # owner/name: a model on the Hugging Face hub
            value = str(fetch_hub_model(value, key=key))
        if not value.startswith(("latest:", "best:")) and is_hf_model_dir(Path(value).expanduser()):
            path = Path(value).expanduser().absolute()
            source = cls(path, True, read_hf_config(path, key), key)
            source.tokenizer()
            return source
        path = resolve_checkpoint(value, key)
        return cls(path, False, read_json(path, "model_config.json"), key)

    def tokenizer(self):
        """The source's tokenizer (loaded once), so token ids mean what they meant."""
        if self._tokenizer is None:
            if self.hf:
                self._tokenizer = load_hf_tokenizer(self.path, self.config["vocab_size"], self.key)
            else:
                self._tokenizer = load_pretrained(str(self.path / "tokenizer"))
        return self._tokenizer

    @property
    def lora(self) -> bool:
        """A LoRA run's checkpoint (its adapters and the base's digest; the base is loaded from its own source)."""
        return not self.hf and is_adapter_checkpoint(self.path)

    def load_weights(self, model: GPT) -> None:
        """Fill `model` (built with this source's config) with its weights (a LoRA run's: its base's with the
        adapters merged)."""
        if self.hf:
            load_hf_weights(self.path, model, self.key)
        elif self.lora:
            model.load_state_dict(self.load()[0].state_dict())
        else:
            load_model_weights(self.path, model)

    def load(self, rope_scaling: dict | None = None, merge: bool = True) -> tuple[GPT, object]:
        """(the model in eval mode, its tokenizer), outside a run (export, lm_eval, generate); `rope_scaling`
        replaces the source's own when given. A LoRA run's checkpoint: its base loaded from the base's own source,
        the adapters applied and merged into the weights (`merge=False`: kept as adapters, for a PEFT export)."""
        if self.lora:
            model, tokenizer = load_adapted(self.path, self._load_base, rope_scaling)
            return (merge_lora(model) if merge else model).eval(), tokenizer
        config = {**self.config, "rope_scaling": rope_scaling} if rope_scaling is not None else self.config
        tokenizer = self.tokenizer()
        model = GPT(GPTConfig(**config))
        self.load_weights(model)
        return model.eval(), tokenizer

    def _load_base(self, init_from: str, rope_scaling: dict | None) -> tuple[GPT, object]:
        """A LoRA checkpoint's base (the init_from its adapters were trained on), loaded as a source of its own."""
        return ModelSource.resolve(init_from, key=f"{self.path}: base").load(rope_scaling)

    def __getstate__(self) -> dict:  # to worker processes: the tokenizer is loaded again there
        return {**self.__dict__, "_tokenizer": None}


def open_source(cfg: DictConfig, explicit: set[str]) -> ModelSource | None:
    """The task's init_from (None without one), after checking the task's need for one (`task.requires_init_from`:
    true, an error without it; warn, a warning). The model keys not set on the command line (`explicit`: the keys
    of the command-line overrides) are taken from its config; `init_from` becomes the resolved dir. The RoPE
    scaling of an HF model (and of any source when `task.source_rope_scaling`, as export and lm_eval) is the
    model's own unless extrapolation is set."""
    need = cfg.task.get("requires_init_from")
    if need == "warn" and not cfg.init_from and not cfg.task.get("allow_scratch"):
        logger.warning(
            f"task={cfg.task.name} without init_from trains from RANDOM weights, not from a pretrained "
            f"model: pass init_from=<run or checkpoint dir> (or init_from=latest:pretrain, or a Hugging "
            f"Face model), or set task.allow_scratch=true if this is on purpose (no warning)"
        )
    elif need and not cfg.init_from and not cfg.task.get("allow_scratch"):
        raise ConfigError(
            f"task={cfg.task.name} starts from a trained model: set init_from=<run or checkpoint dir> "
            f"(or init_from=latest:<task>), or task.allow_scratch=true to start from random weights"
        )
    if not cfg.init_from:
        return None
    source = ModelSource.resolve(cfg.init_from)
    saved = {**DEFAULTS, **source.config}  # an option the source predates (or its family lacks) is off in it
    with open_dict(cfg):  # the source's architecture, except model keys set on the command line
        for key in CARRIED_KEYS:
            if key in saved and key in cfg.model and "model" not in explicit and f"model.{key}" not in explicit:
                cfg.model[key] = with_nested(saved[key], cfg.model, key, explicit)  # before ${model.*} is read
        if "model.max_seq_len" not in explicit and saved.get("pos_emb") == "rope":
            cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.trainer.seq_len)  # a longer-context fine-tune
        own_scaling = source.hf or cfg.task.get("source_rope_scaling")
        if own_scaling and not any(k.split(".")[0] == "extrapolation" for k in explicit):
            cfg.extrapolation = saved.get("rope_scaling") or {"type": "none"}
        cfg.init_from = str(source.path)
    return source


def with_nested(value, model: DictConfig, key: str, explicit: set[str]):
    """The source's model.<key> with the command line's nested overrides (model.<key>.<sub>=..., such as
    model.moe.balance) applied on it, as a top-level model key's override is honoured; one with nothing to apply on
    (the source's model.<key> is not a mapping: a dense source's moe=null) is a ConfigError naming it."""
    subs = sorted(k.split(".", 2)[2] for k in explicit if k.startswith(f"model.{key}."))
    if not subs:
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"model.{key}.{subs[0]}: init_from's model has model.{key}={value!r}, nothing to override")
    merged = OmegaConf.create(value)
    for sub in subs:
        OmegaConf.update(merged, sub, OmegaConf.select(model, f"{key}.{sub}"), merge=False)
    return merged
