"""LoRA through the job (in one process, the small run as its base): SFT with peft=lora reports its trainable
parameters, checkpoints only the adapters and their optimizer state, resumes bit for bit from what a kill -9
leaves (metrics past the checkpoint, a half-written step dir), refuses a resume on another base in one line, and
exports merged (logits of the unmerged model within 1e-5, as transformers loads them) or as a PEFT adapter dir."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llm.checkpoint.files import latest_checkpoint
from llm.errors import ConfigError
from llm.model import GPT, GPTConfig
from llm.tasks.export import export_model
from llm.tasks.source import ModelSource, open_source
from llm.tasks.train import train
from tests.conftest import SMALL, compose_config, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("lora_run")]  # one worker makes lora_run
STEPS = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.log_every=1", "trainer.eval_every=3"]
POST = [
    "task=sft",
    "task.data.eval_samples=2",
    "task.objective.max_new_tokens=4",
    "task.sample.max_new_tokens=0",
    "post_data.train.num_examples=64",
    "post_data.val.num_examples=4",
    "trainer.eval_batches=1",
]


def _run(small_run, run_dir, *extra):
    overrides = [*SMALL, *STEPS, *POST, "logger=none", "peft=lora", "peft.rank=4", f"init_from={small_run}", *extra]
    cfg = compose_config(overrides)
    source = open_source(cfg, {o.split("=")[0] for o in overrides})
    return train(cfg, run_dir, source=source)


@pytest.fixture(scope="module")
def lora_run(small_run, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "sft"
    return run_dir, _run(small_run, run_dir)


def test_reports_trainable_and_checkpoints_only_adapters(lora_run):
    run_dir, results = lora_run
    assert 0 < results["trainable_params"] < results["params"] / 5
    assert results["trainable_share"] == pytest.approx(results["trainable_params"] / results["params"])
    assert json.loads((run_dir / "results.json").read_text())["trainable_params"] == results["trainable_params"]
    ckpt = latest_checkpoint(run_dir)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(k.endswith(("lora_a", "lora_b")) for k in saved)
    optim = load_file(str(ckpt / "optimizer.safetensors"))  # AdamW's exp_avg, exp_avg_sq, step of each adapter
    assert {k.split(".")[0] for k in optim} == {str(i) for i in range(len(saved))}
    info = json.loads((ckpt / "adapter.json").read_text())
    assert info["rank"] == 4 and len(info["base"]["sha256"]) == 64 and info["base"]["init_from"].endswith("0000020")


def test_resume_after_a_kill_is_bit_identical(lora_run, small_run, tmp_path):
    reference_dir, _ = lora_run
    run_dir = tmp_path / "killed"  # killed while writing step 4's checkpoint, after logging step 3
    shutil.copytree(reference_dir, run_dir)
    for step in (4, 6):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:07d}")
    (run_dir / "checkpoints" / "step_0000004.tmp").mkdir()
    (run_dir / "checkpoints" / "last").write_text("step_0000002\n")
    (run_dir / "results.json").unlink()
    reference = read_metrics(reference_dir)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in reference if m["step"] <= 3))
    _run(small_run, run_dir, "resume=auto")
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == [m["step"] for m in reference]
    for a, b in zip(reference, resumed):
        for key in ("loss", "grad_norm", "lr", "val_loss", "tokens"):
            assert a.get(key) == b.get(key), (a["step"], key)
    with pytest.raises(ConfigError, match="trained on other base weights") as e:  # another base: one line
        _run(small_run / "checkpoints" / "step_0000010", run_dir, "resume=auto")
    assert "\n" not in str(e.value)


def test_export_merged_and_as_peft_dir(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, _ = lora_run
    source = ModelSource.resolve(run_dir)
    adapted, tokenizer = source.load(merge=False)
    written = export_model(source, None, tmp_path / "merged", None)
    assert written["merged_lora"] and written["architecture"] == "Qwen3ForCausalLM"  # QK-norm
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([tokenizer("sort: pear apple fig")["input_ids"]])
    later = GPT(GPTConfig(**json.loads((latest_checkpoint(run_dir) / "model_config.json").read_text())))
    source.load_weights(later)  # init_from=<this LoRA run> (e.g. DPO after it): merged
    with torch.no_grad():
        assert (hf(ids).logits - adapted(ids)[..., : len(tokenizer)]).abs().max() < 1e-5
        assert (later.eval()(ids) - adapted(ids)).abs().max() < 1e-5
    written = export_model(source, None, tmp_path / "adapter", None, False)
    assert {"adapter_config.json", "adapter_model.safetensors", "base"} <= set(written["files"])
    assert written["base_model"] == str(tmp_path / "adapter" / "base")
    assert (tmp_path / "adapter" / "base" / "model.safetensors").is_file()  # the base, for PeftModel
