"""Taking a model out of the runner and bringing one in, through run.py: task=export of a run, init_from=<a Hugging
Face model dir> for training, and the errors of both."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm.train.checkpoint import latest_checkpoint, load_checkpoint_model
from tests.conftest import SMALL, run_cli

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")


def test_export_a_run(small_run, cache_dir, tmp_path):
    """task=export init_from=<run dir>: hf/ in the export's run dir, loaded by transformers, same logits as the
    checkpoint; results.json says what was written."""
    run_dir = tmp_path / "export"
    run_cli(["task=export", f"init_from={small_run}", f"hydra.run.dir={run_dir}"], cache_dir)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "export" and results["architecture"] == "LlamaForCausalLM"
    assert results["out_dir"] == str(run_dir / "hf") and "model.safetensors" in results["files"]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and "exported LlamaForCausalLM" in (
        run_dir / "train.log").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    model, ours_tok = load_checkpoint_model(latest_checkpoint(small_run))
    text = "def main():\n    return 0\n"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert ids[0].tolist() == ours_tok(text)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[..., : len(tokenizer)], rtol=0, atol=1e-4)
