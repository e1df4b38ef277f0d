"""GRPO's pieces against hand-computed values: group advantages, the three loss normalisations, the KL and the
clip; with one inner step and beta = 0 the gradient is the group-baseline policy gradient; rewards load by dotted
path and their errors are one line naming the function and the row; left-padded batched generation equals
generating each prompt alone."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from loguru import logger

from llm.data import PromptData, VerifiableTasks
from llm.errors import ConfigError
from llm.eval.sampling import sample_completions
from llm.model import build_gpt
from llm.rewards import exact_match, format_check, load_rewards, numeric_match, score
from llm.rewards.scoring import RewardError
from llm.train.grpo import GRPO, token_logps
from llm.train.grpo_loss import group_advantages, policy_loss
from llm.train.results import log_done
from llm.train.state import TrainerState

pytestmark = pytest.mark.xdist_group("grpo_unit")  # one worker builds the module's model and prompts

ROWS = [{"answer": "3"}, {"answer": "12"}, {"answer": "7"}]


def digits(prompts, completions, rows, per_char=True):
    """A user's reward (named by its dotted path in the tests): the share of digit characters in the reply."""
    return [
        sum(ch.isdigit() for ch in c) / max(len(c), 1) if per_char else float(any(map(str.isdigit, c)))
        for c in completions
    ]


def chars(prompts, completions, rows):
    return [len(c) / 10 for c in completions]


def wrong_length(prompts, completions, rows):
    return [1.0]


def nan_at_row_1(prompts, completions, rows):
    return [0.0, float("nan"), 0.0]


def text_at_row_2(prompts, completions, rows):
    return [0.0, 1.0, "yes"]


def raises(prompts, completions, rows):
    return [r["missing"] for r in rows]


def test_group_advantages_by_hand():
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    std = math.sqrt((4 * 0.5**2) / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    assert zero.tolist() == [False, True]
    adv, _ = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), group_size=2, scale=False)  # Dr. GRPO
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]


def _loss_case():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -1.5, -3.0]])
    old = torch.tensor([[-1.5, -1.9, -0.5], [-0.1, -1.0, -3.0]])
    ref = torch.tensor([[-1.2, -2.0, -0.4], [-0.3, -1.5, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logps, old, ref, mask, torch.tensor([1.0, -0.5])


def _hand_per_token(logps, old, ref, adv, eps, beta):
    """The per-token loss written out with floats: -min(rho A, clip(rho) A) + beta (exp(ref - lp) - (ref - lp) - 1)."""
    out = []
    for i in range(len(logps)):
        row = []
        for lp, o, r in zip(logps[i], old[i], ref[i]):
            rho = math.exp(lp - o)
            surrogate = min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            row.append(-surrogate + beta * (math.exp(r - lp) - (r - lp) - 1))
        out.append(row)
    return out


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_each_variant_equals_hand_computed_values(beta):
    logps, old, ref, mask, adv = _loss_case()
    per_token = _hand_per_token(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), 0.2, beta)
    m = mask.tolist()
    per_seq = [sum(x * k for x, k in zip(per_token[i], m[i])) / sum(m[i]) for i in range(2)]
    total = sum(x * k for i in range(2) for x, k in zip(per_token[i], m[i]))
    expected = {"grpo": sum(per_seq) / 2, "dr_grpo": total / (2 * 8), "dapo": total / 5}
    for variant, want in expected.items():
        loss, metrics = policy_loss(logps, old, adv, mask, variant, 0.2, None, beta, ref, max_tokens=8)
        assert loss.item() == pytest.approx(want, rel=1e-6), variant
    # clipped tokens: row 0 token 0 (rho = e^0.5 > 1.2, A > 0); row 1 token 1 (rho = e^-0.5 < 0.8, A < 0)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    if beta:
        kl = [
            math.exp(r - lp) - (r - lp) - 1
            for i in range(2)
            for lp, r, k in zip(logps[i].tolist(), ref[i].tolist(), m[i])
            if k
        ]
        assert metrics["kl"].item() == pytest.approx(sum(kl) / 5, rel=1e-6)
    else:
        assert "kl" not in metrics


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_two_micro_batches_give_the_whole_batch_loss_and_gradient(variant):
    """The trainer averages the losses of a step's micro-batches (and DDP the ranks' gradients). A batch of 4
    completions (9 tokens) split in two micro-batches of 4 and 5 tokens: the mean of their losses and its gradient
    equal the whole batch's, computed by hand. grpo: the mean of per-sequence means (2 sequences in each half);
    dr_grpo: token sum / (4 x max_tokens); dapo: token sum / 9, which needs the step's token count (GRPO.prepare_step
    sets it: 9 tokens / 2 micro-batches = 4.5 per micro-batch); its own count would give (s1 / 4 + s2 / 5) / 2."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -1.5, -3.0], [-0.7, -0.3, -1.1], [-2.2, -0.4, -0.9]])
    old = torch.tensor([[-1.5, -1.9, -0.5], [-0.1, -1.0, -3.0], [-0.8, -0.3, -1.0], [-2.0, -0.6, -0.9]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0])
    per_token = _hand_per_token(logps.tolist(), old.tolist(), logps.tolist(), adv.tolist(), 0.2, 0.0)
    sums = [sum(x * k for x, k in zip(row, keep)) for row, keep in zip(per_token, mask.tolist())]
    lengths = mask.sum(1).tolist()
    hand = {
        "grpo": sum(s / n for s, n in zip(sums, lengths)) / 4,
        "dr_grpo": sum(sums) / (4 * 8),
        "dapo": sum(sums) / 9,
    }[variant]
    whole = logps.clone().requires_grad_(True)
    loss, _ = policy_loss(whole, old, adv, mask, variant, 0.2, max_tokens=8)
    (grad,) = torch.autograd.grad(loss, whole)
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    objective = GRPO(rewards=[{"_target_": "llm.rewards.exact_match"}], loss_type=variant)
    labels = torch.where(mask.bool(), 1, -100)
    halves = objective.prepare_step([{"labels": labels[:2]}, {"labels": labels[2:]}])
    parts = logps.clone().requires_grad_(True)
    rows = lambda x, i: x[i : i + 2]
    micro = [
        policy_loss(rows(parts, i), rows(old, i), rows(adv, i), rows(mask, i), variant, max_tokens=8, token_count=n)[0]
        for i, n in zip((0, 2), (half.get("token_count") for half in halves))
    ]
    mean = (micro[0] + micro[1]) / 2
    (micro_grad,) = torch.autograd.grad(mean, parts)
    assert mean.item() == pytest.approx(hand, rel=1e-6) and torch.allclose(micro_grad, grad, atol=1e-7)
    if variant == "dapo":
        assert halves[0]["token_count"].item() == 4.5
        own = [policy_loss(rows(logps, i), rows(old, i), rows(adv, i), rows(mask, i), variant)[0] for i in (0, 2)]
        assert (own[0] + own[1]).item() / 2 == pytest.approx((sums[0] + sums[1]) / 4 / 2 + (sums[2] + sums[3]) / 5 / 2)
        assert (own[0] + own[1]).item() / 2 != pytest.approx(hand, rel=1e-3)  # the per-micro-batch mean is not it


def test_clip_higher_widens_only_the_upper_bound():
    logps, old, ref, mask, adv = _loss_case()
    _, wide = policy_loss(logps, old, adv, mask, "dapo", 0.2, epsilon_high=0.7)  # e^0.5 = 1.65 < 1.7: not clipped
    assert wide["clip_fraction"].item() == pytest.approx(1 / 5)


@pytest.fixture(scope="module")
def grpo_setup(tiny_tokenizer):
    torch.manual_seed(0)
    rows = VerifiableTasks(tasks=["count"], num_examples=8)
    held = VerifiableTasks(split="heldout", tasks=["count"], num_examples=4)
    data = PromptData(tiny_tokenizer, rows, held).prepare()
    model = build_gpt(vocab_size=len(tiny_tokenizer), n_layer=2, n_head=2, n_kv_head=2, d_model=32, max_seq_len=128)
    return model, data


def test_one_inner_step_without_kl_is_the_group_baseline_policy_gradient(grpo_setup):
    model, data = grpo_setup
    objective = GRPO(rewards=[{"_target_": "tests.unit.test_grpo.chars"}], group_size=4, max_new_tokens=6)
    objective.setup(model, data)
    batch = objective.prepare(model, data.train.collate([data.train[i] for i in range(3)]), step=0)
    loss, _ = objective.loss(model, batch)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # by hand: REINFORCE with each group's mean as the baseline, scaled by its std, each reply's log-prob averaged
    # over its tokens: grad = -(1/N) sum_i (r_i - mean_g) / (std_g + eps) * (1/|o_i|) sum_t grad log pi(o_it)
    r = batch["stats/rewards"].view(3, 4)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    logps = token_logps(model, batch["input_ids"], batch["labels"])
    lengths = (batch["labels"] != -100).sum(1)
    surrogate = -(adv * logps.sum(1) / lengths).mean()
    surrogate.backward()
    assert adv.abs().sum() > 0  # the groups disagree: a real gradient
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)
    model.zero_grad()


def test_beta_zero_builds_no_reference_and_beta_adds_one(grpo_setup):
    model, data = grpo_setup
    plain = GRPO(rewards=[{"_target_": "llm.rewards.exact_match"}], group_size=2, max_new_tokens=4)
    plain.setup(model, data)
    batch = plain.prepare(model, data.train.collate([data.train[0]]), step=0)
    assert plain.ref_model is None and "ref_logps" not in batch and "old_logps" not in batch
    kl = GRPO(
        rewards=[{"_target_": "llm.rewards.exact_match"}], group_size=2, max_new_tokens=4, beta=0.1, inner_steps=2
    )
    kl.setup(model, data)
    batch = kl.prepare(model, data.train.collate([data.train[0]]), step=0)
    assert torch.allclose(batch["ref_logps"], batch["old_logps"])  # nothing trained yet: the same model
    _, metrics = kl.loss(model, batch)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_sampling_is_a_function_of_seed_step_and_prompts(grpo_setup):
    model, data = grpo_setup
    objective = GRPO(rewards=[{"_target_": "llm.rewards.exact_match"}], group_size=4, max_new_tokens=6)
    objective.setup(model, data)
    collated = data.train.collate([data.train[i] for i in (0, 1)])
    a, b = (objective.prepare(model, collated, step=5)["input_ids"] for _ in range(2))
    c = objective.prepare(model, collated, step=6)["input_ids"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_left_padded_batch_equals_each_prompt_alone(grpo_setup):
    model, data = grpo_setup
    prompts = [data.train[i]["prompt_ids"] for i in range(4)]
    assert len({len(p) for p in prompts}) > 1  # different lengths: padding is exercised
    batched = sample_completions(model, prompts, 8, stop_id=5, temperature=0)
    alone = [sample_completions(model, [p], 8, stop_id=5, temperature=0).ids[0] for p in prompts]
    assert batched.ids == alone
    shared = sample_completions(model, prompts, 8, stop_id=5, temperature=0, samples=3)  # each prompt read once
    assert shared.ids == [ids for ids in alone for _ in range(3)]


def test_builtin_rewards():
    replies = ["3", " 12.0 apples", "seven"]
    assert exact_match([], replies, ROWS) == [1.0, 0.0, 0.0]
    assert numeric_match([], replies, ROWS) == [1.0, 1.0, 0.0]
    assert numeric_match([], ["3.4", "13", "7"], ROWS, tolerance=0.5) == [1.0, 0.0, 1.0]
    assert numeric_match([], ["3.4", "13", "7"], ROWS, tolerance=0.1, relative=True) == [0.0, 1.0, 1.0]
    assert format_check([], replies, ROWS, pattern=r"\d+") == [1.0, 0.0, 0.0]
    assert format_check([], replies, ROWS, max_chars=5) == [1.0, 0.0, 1.0]


def test_rewards_load_by_dotted_path_with_their_arguments():
    rewards = load_rewards(
        [
            {"_target_": "llm.rewards.exact_match", "weight": 2.0},
            {"_target_": "tests.unit.test_grpo.digits", "per_char": False},
            {"_target_": "tests.unit.test_grpo.digits", "name": "d", "weight": -1},
        ]
    )
    assert [r.name for r in rewards] == ["exact_match", "digits", "d"]
    totals, each = score(rewards, ["p"] * 3, ["3", "a1", "xy"], ROWS, ["#1", "#2", "#3"])
    assert each["digits"] == [1.0, 1.0, 0.0] and each["d"] == [1.0, 0.5, 0.0]
    assert totals == [2.0 + 1.0 - 1.0, 0.0 + 1.0 - 0.5, 0.0]


@pytest.mark.parametrize(
    "spec,message",
    [
        ([], "task.rewards must be a non-empty list"),
        ([{"weight": 1}], r"task.rewards\[0\] must be a mapping with _target_"),
        ([{"_target_": "nowhere.fn"}], r"task.rewards\[0\]._target_='nowhere.fn': cannot import module 'nowhere'"),
        ([{"_target_": "llm.rewards.nothing"}], "module 'llm.rewards' has no function 'nothing'"),
        ([{"_target_": "llm.rewards.exact_match", "weight": "x"}], r"task.rewards\[0\].weight='x' must be a finite"),
    ],
)
def test_bad_reward_entries_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_rewards(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fn,message",
    [
        (
            "wrong_length",
            r"reward wrong_length \(tests.unit.test_grpo.wrong_length\) returned 1 values for 3 completions",
        ),
        ("nan_at_row_1", r"reward nan_at_row_1 \(.*\): row 1 \(file.jsonl:2\): returned nan, not a finite number"),
        ("text_at_row_2", r"reward text_at_row_2 \(.*\): row 2 \(file.jsonl:3\): returned 'yes', not a finite number"),
        ("raises", r"reward raises \(.*\) raised KeyError: 'missing'"),
    ],
)
def test_reward_errors_are_one_line_naming_the_function_and_the_row(fn, message):
    rewards = load_rewards([{"_target_": f"tests.unit.test_grpo.{fn}"}])
    with pytest.raises(RewardError, match=message) as e:
        score(rewards, ["p"] * 3, ["a", "b", "c"], ROWS, [f"file.jsonl:{i}" for i in (1, 2, 3)])
    assert "\n" not in str(e.value)


def test_the_plan_line_says_what_a_step_is_and_the_closing_line_what_it_did(tmp_path):
    objective = GRPO(rewards=[{"_target_": "llm.rewards.exact_match"}], group_size=8, max_new_tokens=32, inner_steps=2)
    assert objective.describe_step(batch_size=4, seq_len=128, micro_batch_size=1, accum_steps=2) == (
        "4 prompts x 8 completions = 32 samples of at most 32 new tokens (temperature 1) and 2 optimizer steps on "
        "them (2 micro-batch(es) of 1 prompts per rank, each prompt's group on one rank)"
    )
    lines = []
    handler = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:  # no validation loss: the closing line shows the evaluation's own numbers, before -> after
        grpo = TrainerState(step=3, initial_eval={"exact_match": 0.1, "reward": 0.2})
        grpo.last_eval = {"exact_match": 0.35, "reward": 0.5, "note": "text"}
        log_done(grpo, 3, tmp_path)
        log_done(TrainerState(step=3, initial_val_loss=4.5, last_val_loss=3.25), 3, tmp_path)
    finally:
        logger.remove(handler)
    assert "3 steps in 0.0s, exact_match 0.1 -> 0.35, reward 0.2 -> 0.5; results in" in lines[0]
    assert "val_loss 4.5 -> 3.25" in lines[1]


def test_a_prompt_and_its_completion_past_the_context_is_refused_before_any_step(grpo_setup, tiny_tokenizer):
    _, data = grpo_setup
    train, held = (max(len(r["prompt_ids"]) for r in rows) for rows in (data.train.items, data.eval_rows))
    limit = max(train, held) + 3
    model = build_gpt(vocab_size=len(tiny_tokenizer), n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=limit)
    make = lambda **kw: GRPO(rewards=[{"_target_": "llm.rewards.exact_match"}], group_size=2, **kw)  # noqa: E731
    make(max_new_tokens=limit - max(train, held)).setup(model, data)  # fits exactly
    with pytest.raises(ConfigError) as e:
        make(max_new_tokens=limit - train + 1).setup(model, data)
    assert str(e.value) == (
        f"task.objective.max_new_tokens={limit - train + 1} + the longest training prompt ({train} tokens) = "
        f"{limit + 1} positions, more than model.max_seq_len={limit}: lower task.objective.max_new_tokens, leave "
        f"the longer prompts out (task.data.max_prompt_tokens={train - 1}), or raise model.max_seq_len"
    )
    with pytest.raises(ConfigError, match=r"^task.objective.eval_max_new_tokens=50 \+ the longest held-out prompt"):
        make(max_new_tokens=1, eval_max_new_tokens=50).setup(model, data)
    with pytest.raises(ConfigError, match=r"^task.objective.eval_max_new_tokens=0 must be an integer >= 1"):
        make(max_new_tokens=1, eval_max_new_tokens=0)  # not taken for null (= max_new_tokens)


def _stats(rewards, lengths):
    """A sampled batch's per-completion statistics (groups of 2), as GRPO.prepare lays them out."""
    n = len(rewards)
    return {
        "stats/rewards": torch.tensor(rewards),
        "stats/reward/digits": torch.tensor(rewards) / 2,
        "stats/length": torch.tensor(lengths, dtype=torch.float32),
        "stats/cut": torch.tensor([1.0] + [0.0] * (n - 1)),
        "stats/zero_variance": torch.tensor([float(rewards[i] == rewards[i + 1]) for i in range(0, n, 2)]),
    }


class _Stats(GRPO):
    """GRPO's statistics on a batch that holds only them, with a loss of one parameter: the trainer's path."""

    def loss(self, model, batch):
        return model.weight.sum() * 0, self.batch_metrics(batch)


def test_logged_statistics_are_exact_over_the_step():
    """Two micro-batches, two inner steps, two steps in one log line: the mean, std and max are those of all the
    samples (not means of per-micro-batch stds and maxima)."""
    from llm.train.loggers import MetricsWindow
    from llm.train.steps import train_on

    model = torch.nn.Linear(1, 1)
    objective = _Stats(rewards=[{"_target_": "llm.rewards.exact_match"}], group_size=2, inner_steps=2)
    guard = type("Guard", (), {"spike": lambda self, loss, passes: None})()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    window = MetricsWindow(torch.device("cpu"), summarize=objective.summarize_train)
    steps = [[([0.0, 0.0, 1.0, 1.0], [2, 3, 4, 5]), ([1.0, 1.0, 1.0, 1.0], [8, 1, 1, 1])], [([0.0, 1.0], [3, 3])]]
    for step in steps:  # 2 micro-batches, then 1
        sums, _, _ = train_on(
            model, model, objective, optimizer, [_stats(*b) for b in step], contextlib.nullcontext, None, guard
        )
        window.add(sums, tokens=1)
    logged = window.mean()
    rewards = torch.tensor([r for step in steps for b in step for r in b[0]])
    assert logged["rewards/mean"] == pytest.approx(rewards.mean().item())
    assert logged["rewards/std"] == pytest.approx(rewards.std(correction=0).item())
    assert logged["rewards/digits/std"] == pytest.approx(rewards.std(correction=0).item() / 2)
    assert logged["completions/max_length"] == 8.0 and logged["completions/mean_length"] == pytest.approx(31 / 10)
    assert logged["completions/cut_fraction"] == pytest.approx(3 / 10)
    assert logged["zero_variance_groups"] == pytest.approx(4 / 5)


def test_held_out_evaluation_is_shared_out_over_the_ranks(grpo_setup, monkeypatch):
    """Each of 2 ranks answers every other held-out prompt, once; their counts together give the one-process
    numbers (the sum over ranks is reduce_sums', here collected by hand)."""
    model, data = grpo_setup
    objective = GRPO(rewards=[{"_target_": "tests.unit.test_grpo.chars"}], group_size=2, max_new_tokens=4)
    objective.setup(model, data)
    whole = objective.evaluate(model, data)
    asked, reduced, real = [], [], objective._complete
    monkeypatch.setattr(objective, "_complete", lambda m, p, *a, **k: asked.append(len(p)) or real(m, p, *a, **k))
    monkeypatch.setattr("llm.train.grpo.get_world_size", lambda: 2)
    monkeypatch.setattr("llm.train.grpo.reduce_sums", lambda sums, n: (reduced.append(sums) or sums, n))
    for rank in (0, 1):
        monkeypatch.setattr("llm.train.grpo.get_rank", lambda rank=rank: rank)
        objective.evaluate(model, data)
    n = len(data.eval_rows)
    assert n == 4 and asked == [2, 2]
    assert sum(r["match"].item() for r in reduced) / n == whole["exact_match"]
    assert sum(r["reward"].item() for r in reduced) / n == pytest.approx(whole["reward"])
