"""model=tiny_moe through run.py (shrunk as the other integration runs): the loss falls with the load imbalance,
the balancing losses and no dropped tokens logged; 2 DDP ranks and 2 FSDP2 ranks give the losses of one process
(the aux-loss-free bias summed over the ranks); a run killed with SIGKILL after its step-3 checkpoint resumes bit
for bit, the bias included; and SFT with LoRA from an imported Qwen3-MoE trains and exports to transformers' class.
"""

from __future__ import annotations

import json
import random
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from llm.checkpoint.files import latest_checkpoint
from llm.hf import save_hf
from llm.tasks.source import ModelSource
from tests.conftest import SMALL, read_metrics, run_cli, run_cli_batch, start_run_batch, wait_for_step
from tests.integration.test_distributed import assert_same_losses
from tests.unit.test_moe_families import hf_model

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

MOE = [
    *SMALL,
    "model=tiny_moe",
    "model.moe.num_experts=4",
    "model.moe.expert_hidden=64",
    "model.moe.balance=aux_free",
    "model.moe.bias_update_rate=0.01",
    "optim=adamw",  # Muon (experts included) has its own DDP tolerance: tests/unit/test_muon.py
    "trainer.max_steps=20",  # a warm step takes ~15 ms: a kill at step 4-5 leaves 15 steps and 5 saves (~0.4 s)
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.save_every=3",
    "task.sample.max_new_tokens=4",
]


def _untimed(run_dir) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.endswith(("_s", "seconds"))} for m in read_metrics(run_dir)]


def test_tiny_moe_trains_ddp_fsdp_resumes_after_kill_9_and_sft_lora_exports(small_run, cache_dir, tmp_path):
    single, killed, ddp, fsdp = (tmp_path / name for name in ("single", "killed", "ddp", "fsdp"))
    # the uninterrupted run, then the same run in the same interpreter (warm: it costs no start-up) killed with
    # SIGKILL at a step drawn as tests/integration/test_reliability.py draws it: after the step-3 checkpoint,
    # well before the last step (20)
    kill_at = random.Random(29).randint(4, 5)
    runs = [[*MOE, f"hydra.run.dir={d}"] for d in (single, killed)]
    proc = start_run_batch(runs, cache_dir, tmp_path / "batch.log")
    wait_for_step(proc, killed, kill_at)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (single / "results.json").exists() and not (killed / "results.json").exists()
    run_cli([*MOE, "trainer.nproc_per_node=2", f"hydra.run.dir={ddp}"], cache_dir)
    run_cli([*MOE, "trainer.nproc_per_node=2", "trainer.strategy=fsdp", f"hydra.run.dir={fsdp}"], cache_dir)

    tokenizer = transformers.AutoTokenizer.from_pretrained(latest_checkpoint(small_run) / "tokenizer")
    hf_model("qwen3_moe", tokenizer, tmp_path / "qwen3_moe")
    sft = [o for o in SMALL if not o.startswith(("model.", "trainer."))] + [
        "task=sft",
        "peft=lora",
        f"init_from={tmp_path / 'qwen3_moe'}",
        "trainer.max_steps=3",
        "trainer.batch_size=4",
        "trainer.seq_len=48",
        "trainer.eval_every=3",
        "trainer.eval_batches=1",
        "post_data.train.num_examples=40",
        "post_data.val.num_examples=4",
        "task.data.eval_samples=1",
        "task.objective.max_new_tokens=4",
        "task.sample.max_new_tokens=4",
        f"hydra.run.dir={tmp_path / 'sft'}",
    ]
    for result in run_cli_batch([[*MOE, "resume=auto", f"hydra.run.dir={killed}"], sft], cache_dir):
        assert result["returncode"] == 0, result["stderr"][-3000:]

    metrics = [m for m in read_metrics(single) if "loss" in m]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2
    assert all(m["moe/dropped_tokens"] == 0 and m["moe/load_imbalance"] >= 1 for m in metrics)
    assert {"moe/aux_loss", "moe/router_z_loss"} <= set(metrics[0])
    bias = load_file(str(latest_checkpoint(single) / "model.safetensors"))["blocks.1.mlp.router.bias"]
    assert bias.abs().sum() > 0 and abs(bias.sum().item()) < 1e-5  # nudged every step, centred

    assert_same_losses(single, ddp, steps=range(1, 21))
    assert_same_losses(single, fsdp, steps=range(1, 21))  # the expert stacks sharded over the ranks
    assert "resumed from" in (killed / "train.log").read_text()
    assert _untimed(killed) == _untimed(single)  # the metrics trace, every step's routing metrics included
    a, b = (load_file(str(latest_checkpoint(d) / "model.safetensors")) for d in (single, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the aux-free bias included

    results = json.loads((tmp_path / "sft" / "results.json").read_text())
    assert results["steps"] == 3 and results["trainable_params"] < results["params"]
    written = save_hf(*ModelSource.resolve(tmp_path / "sft").load(), tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(written["out_dir"], attn_implementation="eager")
    assert type(exported).__name__ == "Qwen3MoeForCausalLM"
    model, _ = ModelSource.resolve(tmp_path / "sft").load()
    x = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x)[..., : exported.config.vocab_size], exported.eval()(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    shutil.rmtree(tmp_path / "out")


@pytest.mark.slow
def test_compiled_tiny_moe_gives_eager_losses(cache_dir, tmp_path):
    """trainer.compile=true with model=tiny_moe: inductor compiles the model with the dispatch left eager (the
    cheap dynamo-only check is tests/unit/test_moe.py). Measured: every step's loss within 5e-7 of eager's (relative
    8e-8), the routing metrics equal."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    runs = [[*MOE, f"hydra.run.dir={eager}"], [*MOE, "trainer.compile=true", f"hydra.run.dir={compiled}"]]
    for result in run_cli_batch(runs, cache_dir):
        assert result["returncode"] == 0, result["stderr"][-3000:]
    a, b = read_metrics(eager), read_metrics(compiled)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a[1:], b[1:]):  # [0] is the evaluation before training
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=0), (x, y)
        assert y["moe/load_imbalance"] == x["moe/load_imbalance"]
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-5, abs=0)
