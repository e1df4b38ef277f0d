"""Every open family through run.py: 3 SFT steps from a tiny random model of it (init_from=<HF dir>), then its
export (task=export through run.py for Gemma 3; for the others the same save_hf in-process, to keep the suite
short); transformers loads each export as the family's own class with our logits. The runs share one interpreter
(tests/cli_batch.py). Gemma's run chats through a Gemma-format template (BOS from the template, turns closed by
<end_of_turn>)."""

from __future__ import annotations

import json

import pytest
import torch

from llm.checkpoint.files import latest_checkpoint
from llm.hf import save_hf
from llm.tasks.source import ModelSource
from tests.conftest import SMALL, run_cli_batch
from tests.unit.test_families import CLASSES, GEMMA_TEMPLATE, KINDS, hf_model_dir

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")


def family_tokenizer(small_run, kind: str):
    """The small run's tokenizer (its corpus is cached); for Gemma with Gemma's chat tokens and template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(latest_checkpoint(small_run) / "tokenizer")
    if kind == "gemma3_text":
        tokenizer.add_special_tokens(
            {"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
        )
        tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def test_sft_and_export_every_family(small_run, cache_dir, tmp_path):
    dirs = {kind: hf_model_dir(kind, family_tokenizer(small_run, kind), tmp_path / kind)[1] for kind in KINDS}
    steps = [o for o in SMALL if not o.startswith(("model.", "trainer."))]
    quick = [
        "trainer.max_steps=3",
        "trainer.batch_size=4",
        "trainer.seq_len=48",
        "trainer.eval_every=3",
        "trainer.eval_batches=1",
        "trainer.progress=false",
        "post_data.train.num_examples=40",
        "post_data.val.num_examples=4",
        "task.data.eval_samples=1",
        "task.objective.max_new_tokens=4",
        "task.sample.max_new_tokens=4",
    ]
    runs = [
        [*steps, *quick, "task=sft", f"init_from={path}", f"hydra.run.dir={tmp_path / f'sft_{kind}'}"]
        for kind, path in dirs.items()
    ]
    gemma_export = tmp_path / "export_gemma3_text"
    runs.append(["task=export", f"init_from={tmp_path / 'sft_gemma3_text'}", f"hydra.run.dir={gemma_export}"])
    results = run_cli_batch(runs, cache_dir)
    for kind, result in zip([*KINDS, "export"], results):
        assert result["returncode"] == 0, (kind, result["stderr"][-3000:])
    for i, kind in enumerate(KINDS):
        sft = json.loads((tmp_path / f"sft_{kind}" / "results.json").read_text())
        if kind == "gemma3_text":
            written = json.loads((gemma_export / "results.json").read_text())
        else:  # what task=export does
            written = save_hf(*ModelSource.resolve(tmp_path / f"sft_{kind}").load(), tmp_path / kind / "out")
        assert sft["steps"] == 3 and written["architecture"] == CLASSES[kind], kind
        exported = transformers.AutoModelForCausalLM.from_pretrained(written["out_dir"], attn_implementation="eager")
        assert type(exported).__name__ == CLASSES[kind]
        model, tokenizer = ModelSource.resolve(tmp_path / f"sft_{kind}").load()
        assert model.config.family == kind
        x = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ours, theirs = model(x)[..., : exported.config.vocab_size], exported.eval()(x).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    gemma = transformers.AutoTokenizer.from_pretrained(gemma_export / "hf")
    generation = json.loads((gemma_export / "hf" / "generation_config.json").read_text())
    assert gemma.convert_tokens_to_ids("<end_of_turn>") in generation["eos_token_id"]
