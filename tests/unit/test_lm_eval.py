"""task=lm_eval in-process on a tiny model: lm-eval scores our held-out prompts as we do (the bridge: the same
replies, exact match and log-likelihoods), and bad input is one error raised before anything is written."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

from llm import job
from llm.data import VerifiableTasks
from llm.data.chat import encode_chat, reserved_chat_template
from llm.errors import ConfigError
from llm.eval.exact_match import exact_match, generate_replies
from llm.hf import harness, save_hf
from llm.model import GPT, GPTConfig
from tests.conftest import compose_config

pytestmark = pytest.mark.xdist_group("lm_eval")  # one worker imports lm-eval (seconds) for the whole module
GEN, MC = harness.GEN, harness.MC
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """An untied 2-layer model with weights far from their init, so its greedy replies are varied strings (a tied
    one at init repeats its last input token), exported as an HF dir: (model, tokenizer, HF dir)."""
    tokenizer = reserved_chat_template(copy.deepcopy(tiny_tokenizer))
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=len(tokenizer),
            n_layer=2,
            n_head=4,
            n_kv_head=4,
            d_model=32,
            max_seq_len=64,
            tie_embeddings=False,
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf_dir = tmp_path_factory.mktemp("lm_eval") / "hf"
    save_hf(model.eval(), tokenizer, hf_dir)
    return model, tokenizer, hf_dir


def test_lm_eval_scores_what_we_score(exported, tmp_path):
    """On 8 held-out prompts: lm-eval's greedy replies are ours token for token (left-padded batches of 4 against
    our unpadded ones), its exact match is our exact_match, and its log-likelihood of each answer is ours. Every
    other reference is replaced by the model's own reply wrapped in whitespace, so the exact match is neither 0
    nor 1 and both sides must trim alike."""
    pytest.importorskip("lm_eval")
    model, tokenizer, hf_dir = exported
    rows = list(VerifiableTasks(split="heldout", num_examples=8).rows())
    replies = generate_replies(
        model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for _, r in rows], NEW_TOKENS
    )
    assert len(set(replies)) > 4 and all(r.strip() for r in replies)  # varied, none empty
    for (_, row), reply in list(zip(rows, replies))[::2]:
        row["response"] = f" {reply}\n"
    examples = harness.held_out_examples(rows, tokenizer, str(hf_dir))
    assert harness.write_tasks(tmp_path, examples, tokenizer, [GEN, MC], NEW_TOKENS) == {GEN: 8, MC: 8}
    manager = harness.task_manager([GEN, MC])
    scores, samples = harness.run_lm_eval(hf_dir, harness.task_specs([GEN, MC], tmp_path), manager, batch_size=4)

    ours = exact_match(model, tokenizer, [(e["messages"], e["answer"]) for e in examples], NEW_TOKENS)
    assert ours == 0.5 and scores[f"lm_eval/{GEN}/exact_match"] == ours
    gen = sorted(samples[GEN], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen] == replies
    assert [s["arguments"][0][0] for s in gen] == [e["prompt"] for e in examples]

    right = []
    for s, e in zip(sorted(samples[MC], key=lambda s: s["doc_id"]), examples):
        lls = [resp[0][0] for resp in s["resps"]]
        mine = [reply_logp(model, tokenizer, e["messages"], a) for a in (e["answer"], e["rejected"])]
        if s["doc"]["gold"] == 1:
            mine.reverse()
        torch.testing.assert_close(torch.tensor(lls), torch.tensor(mine), rtol=0, atol=1e-4)
        right.append(lls[s["doc"]["gold"]] > lls[1 - s["doc"]["gold"]])
    assert scores[f"lm_eval/{MC}/acc"] == pytest.approx(sum(right) / len(right))


@torch.no_grad()
def reply_logp(model, tokenizer, prompt: list[dict], answer: str) -> float:
    """Our summed log-probability of an assistant reply (its content and end token) after the prompt, over the
    tokenizer's vocabulary (the export cuts the rows our model pads the embedding with)."""
    start = len(encode_chat(tokenizer, prompt, add_generation_prompt=True)[0])
    ids = torch.tensor([encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}])[0]])
    logp = torch.log_softmax(model(ids[:, :-1])[..., : len(tokenizer)].float(), dim=-1)[0, start - 1 :]
    return logp.gather(-1, ids[0, start:, None]).sum().item()


def run_job(tmp_path: Path, *overrides: str):
    """job.run as run.py calls it, into tmp_path/run."""
    cfg = compose_config(["task=lm_eval", *overrides])
    hydra = OmegaConf.create(
        {"runtime": {"output_dir": str(tmp_path / "run")}, "overrides": {"task": list(overrides)}, "mode": RunMode.RUN}
    )
    return job.run(cfg, hydra)


@pytest.fixture
def few_lm_eval_tasks(monkeypatch):
    """lm-eval's own task index cut to its hellaswag folder (the whole ~14k files take seconds), offline."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks._index import TaskIndex

    root, walk = Path(lm_eval.__file__).parent / "tasks", TaskIndex._iter_yaml_files
    monkeypatch.setattr(
        TaskIndex,
        "_iter_yaml_files",
        staticmethod(lambda path: walk(root / "hellaswag") if Path(path) == root else walk(path)),
    )
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["task.tasks=[llm_builtin_gen,llm_builtin_qa]"],
            "task.tasks: 'llm_builtin_qa' is not one of ours (llm_builtin_gen, llm_builtin_mc)",
        ),
        (
            ["task.tasks=[hellaswagg]"],
            "task.tasks: 'hellaswagg' is not an lm-eval task; ours are llm_builtin_gen, "
            "llm_builtin_mc, and `lm_eval --tasks list` lists lm-eval's own",
        ),
        (["task.tasks=[hellaswag]"], "task.tasks: the data of lm-eval's hellaswag does not load"),  # offline here
        (["task.num_fewshot=2"], "task.num_fewshot=2: llm_builtin_gen, llm_builtin_mc are zero-shot chat prompts"),
        (["task.limit=0"], "task.limit=0 must be an integer >= 1 (or null)"),
        (["init_from={tmp}"], "init_from='{tmp}': no complete checkpoint"),
        (["post_data=files", "post_data.train.paths=[rows.jsonl]"], "task.rows is null (post_data.val)"),
    ],
    ids=["ours", "theirs", "offline", "fewshot", "limit", "not-a-model", "no-rows"],
)
def test_bad_input_writes_nothing(exported, few_lm_eval_tasks, tmp_path, overrides, message):
    init = [] if any(o.startswith("init_from") for o in overrides) else [f"init_from={exported[2]}"]
    with pytest.raises(ConfigError) as error:
        run_job(tmp_path, *init, *(o.replace("{tmp}", str(tmp_path)) for o in overrides))
    assert message.replace("{tmp}", str(tmp_path)) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_missing_extra_is_named_before_any_work(monkeypatch, tmp_path):
    """Without lm-eval (an import that fails), the error names the extra; even init_from is not looked at yet."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match=r"task=lm_eval needs the optional lm-eval extra: pip install -e \.\[eval\]"):
        run_job(tmp_path, "init_from=/nonexistent")
    assert not (tmp_path / "run").exists()


def test_downstream_scores_equal_lm_eval(exported, tmp_path):
    """Parity of the downstream evaluations (llm/eval/downstream.py) with lm-eval on a local multiple-choice task of
    30 items: per choice the same log-likelihood (<= 1e-4) and the same acc / acc_norm, for our model as trained
    and for the same model imported back from its HF export."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from llm.eval.downstream import aggregate, item_metrics, score_items
    from llm.eval.items import file_items
    from llm.tasks.source import ModelSource
    from tests.unit.test_downstream import mc_rows, write_jsonl

    model, tokenizer, hf_dir = exported
    rows = mc_rows(30)
    items = file_items(write_jsonl(tmp_path / "items.jsonl", rows), "mc", "path")
    docs = [{"prompt": r["context"], "choices": r["choices"], "gold": r["gold"]} for r in rows]
    config = {
        "output_type": "multiple_choice",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",  # our continuations carry their leading space
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
    harness._write_task(tmp_path, "llm_parity", docs, config)
    scores, samples = harness.run_lm_eval(
        hf_dir, [str(tmp_path / "llm_parity.yaml")], TaskManager(include_defaults=False), batch_size=8
    )
    theirs = [[resp[0][0] for resp in s["resps"]] for s in sorted(samples["llm_parity"], key=lambda s: s["doc_id"])]
    imported, _ = ModelSource.resolve(str(hf_dir)).load()
    for ours in (model, imported):
        scored = score_items(ours, tokenizer, items, ours.config.max_seq_len, batch_items=4)
        torch.testing.assert_close(torch.tensor([s.lls for s in scored]), torch.tensor(theirs), rtol=0, atol=1e-4)
        per_item = [item_metrics(it, s, "mc") for it, s in zip(items, scored)]
        mine = aggregate(per_item, ["acc", "acc_norm"])
        assert mine == {m: pytest.approx(scores[f"lm_eval/llm_parity/{m}"]) for m in ("acc", "acc_norm")}
    assert 0 < mine["acc"] < 1 and mine["acc"] != mine["acc_norm"]  # neither trivial nor the same ranking


def test_task_evaluate_on_an_hf_dir(exported, tmp_path):
    """task=evaluate init_from=<HF dir>: the downstream tasks scored with no training, results.json with their keys,
    the same values as the scorer gives the model itself."""
    from llm.train.downstream import DownstreamEvals
    from tests.unit.test_downstream import mc_rows, toy_task, write_jsonl

    model, tokenizer, hf_dir = exported
    rows = write_jsonl(tmp_path / "items.jsonl", mc_rows(9))
    task = f"+evals.tasks.toy={{source:jsonl,path:{rows},type:mc,metrics:[acc,acc_norm,bpb],primary:acc_norm}}"
    cfg = compose_config(["task=evaluate", f"init_from={hf_dir}", task])
    hydra = OmegaConf.create(
        {"runtime": {"output_dir": str(tmp_path / "run")}, "overrides": {"task": [task]}, "mode": RunMode.RUN}
    )
    results = job.run(cfg, hydra)
    expected = DownstreamEvals({"toy": toy_task(rows, metrics=["acc", "acc_norm", "bpb"])}).run(model, tokenizer)
    assert {k: v for k, v in results.items() if k.startswith("eval/")} == pytest.approx(expected, abs=1e-5)
    assert results["task"] == "evaluate" and set(expected) <= set(
        json.loads((tmp_path / "run/results.json").read_text())
    )
