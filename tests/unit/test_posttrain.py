"""SFT and DPO pieces: chat template and masks, row validation, packing equivalence, built-in tasks, DPO losses
against hand-computed values, precomputed vs live reference."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch

from llm.data import LocalRows, PreferenceData, SFTData, VerifiableTasks, train_bpe
from llm.data.chat import BUILTIN_TEMPLATE, encode_chat, to_messages
from llm.data.sources import FileCorpus
from llm.errors import ConfigError, DataError
from llm.model import build_gpt
from llm.train.objectives import DPO, LanguageModeling, preference_loss

CONV = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "add: 2 + 3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "reverse: a b"},
    {"role": "assistant", "content": "b a"},
]


pytestmark = pytest.mark.xdist_group("posttrain")  # one worker trains the module's tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    src = tmp / "corpus.txt"
    rows = [r for _, r in VerifiableTasks(num_examples=500).rows()]
    src.write_text("\n".join(f"{r['prompt']} {r['response']}" for r in rows))
    return train_bpe(FileCorpus(str(src)), vocab_size=400, cache_dir=str(tmp / "cache"))


def test_builtin_template_ids_and_assistant_mask(tokenizer):
    assert tokenizer.chat_template == BUILTIN_TEMPLATE
    ids, mask = encode_chat(tokenizer, CONV)
    assert ids == tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    masked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert masked == "5<|end|>b a<|end|>"
    prompt_ids, _ = encode_chat(tokenizer, CONV[:2], add_generation_prompt=True)
    assert ids[: len(prompt_ids)] == prompt_ids


def test_foreign_template_mask(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    ids, mask = encode_chat(tok, CONV)
    masked = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "5" in masked and "b a" in masked and "add" not in masked and "be brief" not in masked


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "x"}, "missing field 'response'"),
        ({"prompt": "", "response": "y"}, "field 'prompt' is empty"),
        ({"prompt": 3, "response": "y"}, "field 'prompt' must be a string"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        ({"messages": [{"role": "user", "content": " "}]}, "empty content"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ],
)
def test_row_errors_name_the_row(row, message):
    with pytest.raises(DataError, match=f"data.jsonl:7: .*{message}"):
        to_messages(row, "data.jsonl:7")


def test_local_rows_errors(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: a row must be a JSON object"):
        list(LocalRows(str(bad)).rows())
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"\n')
    with pytest.raises(DataError, match=r"rows.jsonl:3: not valid JSON"):
        list(LocalRows(str(bad)).rows())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="contain no rows"):
        list(LocalRows(str(empty)).rows())


def _sft(tokenizer, tmp_path, rows, **kw):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SFTData(tokenizer, LocalRows(str(path)), val_source=LocalRows(str(path)), **kw).prepare()


def test_sft_labels_only_on_assistant_tokens(tokenizer, tmp_path):
    data = _sft(tokenizer, tmp_path, [{"messages": CONV}], seq_len=64)
    s = data.train[0]
    labelled = [t for t in s["labels"] if t != -100]
    assert tokenizer.decode(labelled) == "5<|end|>b a<|end|>"
    assert data.eval_examples == [(CONV[:4], "b a")]


def test_validation_split_keeps_each_prompt_on_one_side(tokenizer, tmp_path):
    """No val_source: rows are split by a hash of the prompt, so a prompt repeated on several lines (several
    preference pairs for one prompt, a duplicated row) is never both trained on and validated."""
    rows = [{"prompt": f"p{i % 40}", "chosen": "yes", "rejected": f"no {i}"} for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceData(tokenizer, LocalRows(str(path)), seq_len=32, val_fraction=0.3).prepare()
    prompts = lambda split: {tokenizer.decode(s["chosen_input_ids"]) for s in split.samples}
    train, val = prompts(data.train), prompts(data.val)
    assert train and val and not train & val
    assert len(data.train) + len(data.val) == 200


def test_preference_replies_given_as_whole_conversations(tokenizer, tmp_path):
    """ultrafeedback_binarized style: chosen/rejected repeat the prompt's turns; the prompt is encoded once."""
    prompt = [{"role": "user", "content": "sort: b a"}]
    rows = [
        {
            "prompt": "sort: b a",
            "chosen": [*prompt, {"role": "assistant", "content": "a b"}],
            "rejected": [*prompt, {"role": "assistant", "content": "b a"}],
        },
        {"prompt": prompt, "chosen": "a b", "rejected": "b a"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceData(tokenizer, LocalRows(str(path)), val_source=LocalRows(str(path)), seq_len=32).prepare()
    whole, plain = data.train.samples
    assert whole["chosen_input_ids"] == plain["chosen_input_ids"]
    assert whole["rejected_labels"] == plain["rejected_labels"]


def test_overlong_truncate_and_drop(tokenizer, tmp_path):
    rows = [{"prompt": "count self: " + "self " * 40, "response": "40"}, {"prompt": "hi", "response": "yo"}]
    truncated = _sft(tokenizer, tmp_path, rows, seq_len=16)
    assert truncated.stats["train"]["overlong"] == 1
    assert len(truncated.train) == 1  # the long one has no assistant token left within 16 tokens
    dropped = _sft(tokenizer, tmp_path, rows, seq_len=16, overlong="drop")
    assert dropped.stats["train"] == {"rows": 2, "overlong": 1, "kept": 1}
    with pytest.raises(ConfigError, match="task.data.overlong"):
        _sft(tokenizer, tmp_path, rows, seq_len=16, overlong="cut")


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_packed_loss_equals_unpacked_loss(tokenizer, tmp_path, pos_emb):
    rows = [r for _, r in VerifiableTasks(num_examples=12).rows()]
    plain = _sft(tokenizer, tmp_path, rows, seq_len=64)
    packed = _sft(tokenizer, tmp_path, rows, seq_len=64, packing=True)
    assert len(packed.train) < len(plain.train)
    torch.manual_seed(0)
    model = build_gpt(
        vocab_size=len(tokenizer), n_layer=2, n_head=4, n_kv_head=4, d_model=32, max_seq_len=64, pos_emb=pos_emb
    )
    objective = LanguageModeling()
    a, _ = objective.loss(model, plain.train.collate(list(plain.train)))
    b, _ = objective.loss(model, packed.train.collate(list(packed.train)))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.backward()
    grad_plain = model.tok_emb.weight.grad.clone()
    model.zero_grad()
    b.backward()
    torch.testing.assert_close(model.tok_emb.weight.grad, grad_plain, atol=1e-5, rtol=1e-4)


def test_builtin_tasks_split_and_no_constant_answer():
    every = ("reverse", "sort", "rotate", "count", "add")
    train = [r for _, r in VerifiableTasks("train", tasks=every, num_examples=2500).rows()]
    heldout = [r for _, r in VerifiableTasks("heldout", tasks=every, num_examples=500).rows()]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    again = VerifiableTasks("train", tasks=every, num_examples=50).rows()
    assert [r["prompt"] for _, r in again] == [r["prompt"] for r in train[:50]]
    # offset: the prompts after the first N (a DPO run on prompts its SFT run never saw)
    later = VerifiableTasks("train", tasks=every, num_examples=30, offset=50).rows()
    assert [r["prompt"] for _, r in later] == [r["prompt"] for r in train[50:80]]
    assert all(r["chosen"] != r["rejected"] for r in train + heldout)
    # the most frequent training answer, given to every held-out prompt, scores <= 0.2 exact match
    for task in every:
        task_train = [r for r in train if r["task"] == task]
        task_held = [r for r in heldout if r["task"] == task]
        top, _ = Counter(r["response"] for r in task_train).most_common(1)[0]
        assert sum(r["response"] == top for r in task_held) / len(task_held) <= 0.2, task
    top, _ = Counter(r["response"] for r in train).most_common(1)[0]
    assert sum(r["response"] == top for r in heldout) / len(heldout) <= 0.2


def test_builtin_list_length():
    """list_length sets the words per list of reverse, sort and rotate (count and add keep theirs); the default
    draws the rows it always drew; a bad range is a one-line error."""
    every = ("reverse", "sort", "rotate", "count", "add")
    default = [r for _, r in VerifiableTasks(tasks=every, num_examples=50).rows()]
    assert [r["prompt"] for r in default[:5]] == [  # as drawn before list_length existed
        "count text: args text text text text text",
        "add: 6 + 46",
        "reverse: last sort error value left",
        "sort: new text error sort",
        "rotate: code name error self type",
    ]
    assert default == [r for _, r in VerifiableTasks(tasks=every, num_examples=50, list_length=[3, 5]).rows()]
    longer = [r for _, r in VerifiableTasks(tasks=every, num_examples=200, list_length=(6, 7)).rows()]
    words = lambda r: len(r["prompt"].split(": ", 1)[1].split())
    assert {words(r) for r in longer if r["task"] in ("reverse", "sort", "rotate")} == {6, 7}
    assert max(words(r) for r in longer if r["task"] == "count") <= 7
    for r in longer:
        if r["task"] == "sort":
            assert r["response"] == " ".join(sorted(r["prompt"].split(": ", 1)[1].split()))
    for bad in ([5, 3], [1, 4], [3], "3-5", [3, 41]):
        with pytest.raises(ConfigError, match=r"list_length=.* must be \[min, max\] words"):
            VerifiableTasks(list_length=bad)


def test_dpo_losses_match_hand_computed_values():
    pc, pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.5])
    h = (-5.0 + 6.0) - (-7.0 + 6.5)  # 1.5
    beta = 0.1
    sig = lambda x: 1 / (1 + math.exp(-x))
    loss, m = preference_loss(pc, pr, rc, rr, beta, "sigmoid")
    assert loss.item() == pytest.approx(-math.log(sig(beta * h)))
    loss, _ = preference_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * math.log(sig(beta * h)) - 0.2 * math.log(sig(-beta * h)))
    loss, _ = preference_loss(pc, pr, rc, rr, beta, "ipo")
    assert loss.item() == pytest.approx((h - 1 / (2 * beta)) ** 2)
    loss, _ = preference_loss(pc, pr, rc, rr, beta, "hinge")
    assert loss.item() == pytest.approx(max(0.0, 1 - beta * h))
    assert m["rewards/chosen"].item() == pytest.approx(beta * 1.0)
    assert m["rewards/rejected"].item() == pytest.approx(beta * -0.5)
    assert m["rewards/margin"].item() == pytest.approx(beta * 1.5)
    assert m["rewards/accuracy"].item() == 1.0


def _pref(tokenizer):
    return PreferenceData(
        tokenizer,
        VerifiableTasks("train", num_examples=20),
        val_source=VerifiableTasks("heldout", num_examples=6),
        seq_len=64,
    ).prepare()


def test_precomputed_reference_equals_live_and_dpo_starts_at_log2(tokenizer):
    torch.manual_seed(0)
    model = build_gpt(vocab_size=len(tokenizer), n_layer=2, n_head=4, n_kv_head=4, d_model=32, max_seq_len=64)
    data = _pref(tokenizer)
    pre, live = DPO(reference="precomputed", ref_batch_size=7), DPO(reference="live")
    pre.setup(model, data)
    live.setup(model, data)
    batch = data.train.collate([data.train[i] for i in range(8)])
    ref_c, ref_r = DPO._logps(live.ref_model, batch)
    torch.testing.assert_close(batch["ref_chosen_logp"], ref_c, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batch["ref_rejected_logp"], ref_r, atol=1e-4, rtol=1e-5)
    for objective in (pre, live):
        loss, metrics = objective.loss(model, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
        assert metrics["rewards/margin"].abs().item() < 1e-4
    # the response log-probs are summed over response tokens only
    c = batch["chosen_labels"][0]
    assert (c != -100).sum() < (batch["chosen_input_ids"][0] != tokenizer.pad_token_id).sum()


def test_dpo_training_moves_preferences(tokenizer):
    torch.manual_seed(0)
    model = build_gpt(vocab_size=len(tokenizer), n_layer=2, n_head=4, n_kv_head=4, d_model=32, max_seq_len=64)
    data = _pref(tokenizer)
    objective = DPO(beta=0.5)
    objective.setup(model, data)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = data.train.collate(list(data.train))
    for _ in range(15):
        loss, metrics = objective.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert metrics["rewards/accuracy"].item() == 1.0 and loss.item() < 0.5


def test_resize_vocab_keeps_existing_logits():
    torch.manual_seed(0)
    model = build_gpt(vocab_size=60, n_layer=1, n_head=2, n_kv_head=2, d_model=16).eval()
    x = torch.randint(0, 60, (1, 5))
    before = model(x)[..., :60]
    model.resize_vocab(62)  # fits in the 64 padded rows
    torch.testing.assert_close(model(x)[..., :60], before)
    model.resize_vocab(70)  # grows the padded table
    assert model.tok_emb.weight.shape[0] == 128 and model.lm_head.weight is model.tok_emb.weight
    torch.testing.assert_close(model(x)[..., :60], before)


def test_pairs_without_a_preference_are_dropped_and_counted(tokenizer, tmp_path):
    """chosen == rejected would train with zero gradient: such pairs are dropped, counted in the log line, and a
    split left with none is a one-line error, never a silent run."""
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceData(tokenizer, LocalRows(str(path)), val_source=LocalRows(str(path)), seq_len=32).prepare()
    assert len(data.train) == 1 and data.stats["train"]["identical"] == 1
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match=r"no usable train row: .*1 with chosen == rejected \(dropped\)"):
        PreferenceData(tokenizer, LocalRows(str(path)), val_source=LocalRows(str(path)), seq_len=32).prepare()


@pytest.mark.parametrize("chosen", [[], [{"role": "user", "content": "more?"}]])
def test_a_reply_without_an_assistant_message_names_the_row(tokenizer, tmp_path, chosen):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": chosen, "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=f"^{path}:1: field 'chosen' must end with an assistant message"):
        PreferenceData(tokenizer, LocalRows(str(path)), val_source=LocalRows(str(path)), seq_len=32).prepare()


def test_dpo_plan_line_counts_pairs():
    """trainer.batch_size counts preference pairs under task=dpo: each is a chosen and a rejected sequence."""
    line = DPO().describe_step(32, 64, 16, 2)
    assert line == (
        "32 preference pairs (chosen and rejected: 64 sequences) x 64 tokens (2 micro-batch(es) of 16 pairs per rank)"
    )
