"""Taking a model out of the runner and bringing one in, through run.py: task=export of a run, init_from=<a Hugging
Face model dir> for training, task=lm_eval of a run, and the errors of export and import."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm.checkpoint.files import latest_checkpoint
from llm.data import VerifiableTasks
from llm.data.hub import offline_reason
from llm.errors import ConfigError, DataError
from llm.eval.exact_match import generate_replies
from llm.hf import save_hf
from llm.tasks.source import ModelSource, open_source
from tests.conftest import SMALL, compose_config, run_cli_batch

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")
USES_RUNS = pytest.mark.xdist_group("use")  # the tests of the module's batch of runs: on one worker


@pytest.fixture(scope="module")
def use_runs(small_run, cache_dir, tmp_path_factory) -> dict:
    """The module's runs through run.py, one after the other in one interpreter (run_cli_batch): task=export of the
    small run, SFT from an HF Llama dir, pretraining from an HF GPT-2 dir, task=lm_eval of the small run (with
    lm-eval installed): {"dir": their tmp dir, name: result}."""
    tmp = tmp_path_factory.mktemp("use")
    llama, gpt2 = hf_model_dir(small_run, tmp / "llama", "llama"), hf_model_dir(small_run, tmp / "gpt2", "gpt2")
    post = [
        "task.data.eval_samples=8",
        "post_data.train.num_examples=100",
        "post_data.val.num_examples=8",
        "task.objective.max_new_tokens=8",
    ]
    steps = [o for o in SMALL if not o.startswith(("model.", "trainer.max_steps"))] + ["trainer.max_steps=5"]
    runs = {
        "export": ["task=export", f"init_from={small_run}", f"hydra.run.dir={tmp / 'export'}"],
        "sft": [*steps, *post, "task=sft", f"init_from={llama}", f"hydra.run.dir={tmp / 'sft'}"],
        "pre": [*steps, "task.sample.max_new_tokens=80", f"init_from={gpt2}", f"hydra.run.dir={tmp / 'pre'}"],
    }
    if importlib.util.find_spec("lm_eval"):
        lm_eval = ["task=lm_eval", f"init_from={small_run}", "task.limit=4", "task.max_new_tokens=8"]
        runs["lm_eval"] = [*lm_eval, f"hydra.run.dir={tmp / 'lm_eval'}"]
    results = run_cli_batch(list(runs.values()), cache_dir, env={"HF_DATASETS_OFFLINE": "1"})
    return {"dir": tmp, **dict(zip(runs, results))}


def _finished(use_runs, name: str) -> Path:
    assert use_runs[name]["returncode"] == 0, use_runs[name]["stderr"][-3000:]
    return use_runs["dir"] / name


@USES_RUNS
def test_export_a_run(small_run, use_runs):
    """task=export init_from=<run dir>: hf/ in the export's run dir, loaded by transformers, same logits as the
    checkpoint; results.json says what was written."""
    run_dir = _finished(use_runs, "export")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "export" and results["architecture"] == "Qwen3ForCausalLM"  # QK-norm
    assert results["out_dir"] == str(run_dir / "hf") and "model.safetensors" in results["files"]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and "exported Qwen3ForCausalLM" in (
        run_dir / "train.log"
    ).read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    model, ours_tok = ModelSource.resolve(small_run).load()
    text = "def main():\n    return 0\n"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert ids[0].tolist() == ours_tok(text)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[..., : len(tokenizer)], rtol=0, atol=1e-4)


def hf_model_dir(small_run, path, kind: str):
    """An HF model built from a config (random weights) and saved with save_pretrained, with the small run's
    tokenizer (so the cached corpus and the built-in chat template apply): an untied GQA Llama whose vocabulary is
    larger than the tokenizer, or a GPT-2 with a 64-position table."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(latest_checkpoint(small_run) / "tokenizer")
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer) + 7,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            rope_theta=5e4,
        )
    else:
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@USES_RUNS
def test_train_from_hf_models_and_export_back(use_runs, tmp_path):
    """init_from=<HF dir>: SFT from an untied GQA Llama, continued pretraining of a GPT-2 whose 64 positions the
    end-of-run sample outgrows (its context is cropped); the architecture comes from config.json; exports load in
    transformers, and an export of the untouched import holds the very same tensors."""
    sft_dir, pre_dir, llama = _finished(use_runs, "sft"), _finished(use_runs, "pre"), use_runs["dir"] / "llama"
    sft, pre = (json.loads((d / "results.json").read_text()) for d in (sft_dir, pre_dir))
    assert sft["steps"] == pre["steps"] == 5 and sft["val_loss"] < sft["initial_val_loss"] and pre["sample"]
    saved = json.loads((latest_checkpoint(sft_dir) / "model_config.json").read_text())
    assert (saved["tie_embeddings"], saved["n_kv_head"], saved["rope_theta"], saved["d_model"]) == (False, 2, 5e4, 64)
    assert "init_from:" in (sft_dir / "train.log").read_text()
    save_hf(*ModelSource.resolve(sft_dir).load(), tmp_path / "sft_hf")  # as task=export does
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sft_hf")
    assert type(exported).__name__ == "LlamaForCausalLM" and exported.config.num_key_value_heads == 2
    assert not exported.config.tie_word_embeddings
    before, after = (
        load_file(str(llama / "model.safetensors")),
        load_file(str(tmp_path / "sft_hf" / "model.safetensors")),
    )
    assert before.keys() == after.keys()
    rows = before["model.embed_tokens.weight"].size(0) - 7  # the 7 rows past the tokenizer: never an input
    assert torch.equal(before["model.embed_tokens.weight"][rows:], after["model.embed_tokens.weight"][rows:])
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # the rest was trained


def test_init_from_what_cannot_be_imported(small_run, tmp_path, monkeypatch):
    """A dir that is not a model, a config we cannot represent, a tokenizer larger than the vocabulary: one error
    naming it, raised while resolving init_from, before anything is built or written (run.py prints it as one line,
    exit code 2: tests/integration/test_run.py)."""
    cfg = lambda path: compose_config(["task=sft", f"init_from={path}"])
    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match=f"init_from='{tmp_path / 'notes'}': no complete checkpoint"):
        open_source(cfg(tmp_path / "notes"), set())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # owner/name: the hub (offline here)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline_reason.cache_clear()  # asked again, with the variable set
    with pytest.raises(
        ConfigError,
        match="init_from=nobody/no-such-model: not in the local Hugging Face cache and "
        r"the hub is offline \(HF_HUB_OFFLINE=1\)",
    ):
        open_source(cfg("nobody/no-such-model"), set())
    offline_reason.cache_clear()
    llama = hf_model_dir(small_run, tmp_path / "llama", "llama")
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"init_from='.*llama': config.json: model_type='bert' is not supported"):
        open_source(cfg(llama), set())
    (llama / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ConfigError, match="mlp_bias=False is not supported"):
        open_source(cfg(llama), set())
    (llama / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    with pytest.raises(DataError, match="tokens but the model's vocabulary \\(config.json vocab_size\\) only 300"):
        open_source(cfg(llama), set())
    (llama / "config.json").write_text(json.dumps(config))
    resolved = cfg(llama)
    open_source(resolved, set())
    assert resolved.model.n_kv_head == 2 and resolved.model.rope_theta == 5e4 and resolved.init_from == str(llama)
    assert resolved.model.qk_norm is False  # the preset's QK-norm gives way to a family without it


@USES_RUNS
def test_lm_eval_of_a_run(small_run, use_runs):
    """task=lm_eval init_from=<run dir> task.limit=4, offline: the run is exported to hf/, our two tasks are written
    from all 200 held-out rows into lm_eval/, lm-eval scores the first 4 of each, and results.json has its scores
    as flat keys; lm-eval's replies are the checkpoint's own greedy replies to the same prompts."""
    pytest.importorskip("lm_eval")
    run_dir = _finished(use_runs, "lm_eval")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "lm_eval" and results["exported"] and results["model_dir"] == str(run_dir / "hf")
    assert results["tasks"] == ["llm_builtin_gen", "llm_builtin_mc"] and results["limit"] == 4
    assert results["examples"] == {"llm_builtin_gen": 200, "llm_builtin_mc": 200} and results["lm_eval_version"]
    assert {
        "lm_eval/llm_builtin_gen/exact_match",
        "lm_eval/llm_builtin_mc/acc",
        "lm_eval/llm_builtin_mc/acc_norm",
    } <= results.keys() and 0 <= results["lm_eval/llm_builtin_mc/acc"] <= 1
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "hf" / "model.safetensors").is_file()
    assert "lm_eval/llm_builtin_mc/acc = " in (run_dir / "train.log").read_text()
    assert sorted(p.name for p in (run_dir / "lm_eval").iterdir()) == [
        "llm_builtin_gen.jsonl",
        "llm_builtin_gen.yaml",
        "llm_builtin_mc.jsonl",
        "llm_builtin_mc.yaml",
        "samples",
    ]
    for name in ("llm_builtin_gen", "llm_builtin_mc"):
        assert (run_dir / "lm_eval" / f"{name}.yaml").is_file()
        assert len((run_dir / "lm_eval" / f"{name}.jsonl").read_text().splitlines()) == 200
    samples = [
        json.loads(line)
        for line in (run_dir / "lm_eval" / "samples" / "llm_builtin_gen.jsonl").read_text().splitlines()
    ]
    model, tokenizer = ModelSource.resolve(small_run).load()
    rows = VerifiableTasks(split="heldout", num_examples=4).rows()
    replies = generate_replies(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for _, r in rows], 8)
    assert [s["resps"][0][0] for s in samples] == replies
