"""task=grpo through the one training loop, in-process on a tiny model: the reward rises within a few steps, the
run writes the GRPO metrics and the before/after evaluation, and a resumed run samples and trains exactly as the
uninterrupted one did."""

from __future__ import annotations

import json

import torch

from llm.data import PromptData, VerifiableTasks
from llm.model import build_gpt
from llm.train import RunInfo, Trainer, trainer_settings
from llm.train.grpo import GRPO
from llm.train.optim import OptimizerConfig

REWARD = [{"_target_": "tests.unit.test_grpo.digits", "per_char": False}]  # a user's function: any digit in the reply


def _fit(tokenizer, run_dir, steps=6, save_every=0, resume=None):
    torch.manual_seed(0)
    data = PromptData(
        tokenizer,
        VerifiableTasks(tasks=["count"], num_examples=64),
        VerifiableTasks(split="heldout", tasks=["count"], num_examples=8),
    )
    model = build_gpt(vocab_size=len(tokenizer) + 4, n_layer=1, n_head=2, n_kv_head=2, d_model=32, max_seq_len=64)
    objective = GRPO(rewards=REWARD, group_size=8, max_new_tokens=4, seed=3)
    settings = trainer_settings(
        max_steps=steps, batch_size=4, seq_len=64, eval_every=steps, log_every=1, save_every=save_every, progress=False
    )
    optim = OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.0, schedule="constant")
    run = RunInfo(str(run_dir), task="grpo", seed=0, resume=resume)
    results = Trainer(model, data, objective, optim, settings, run, tokenizer=tokenizer).fit()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return results, metrics


def test_rewards_rise_and_a_resumed_run_is_the_same_run(tiny_tokenizer, tmp_path):
    results, metrics = _fit(tiny_tokenizer, tmp_path / "a", save_every=3)
    rewards = [m["rewards/mean"] for m in metrics if "rewards/mean" in m]
    assert len(rewards) == 6
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards  # from ~0.2 to ~1 in a few steps
    last = metrics[-1]
    for key in (
        "rewards/std",
        "rewards/digits/mean",
        "rewards/digits/std",
        "clip_fraction",
        "zero_variance_groups",
        "completions/mean_length",
        "completions/max_length",
        "completions/cut_fraction",
        "time/generate_share",
        "time/train_share",
        "exact_match",
        "reward",
    ):
        assert key in last, key
    assert 0 < last["time/generate_share"] < 1
    for key in ("exact_match", "exact_match_before", "reward", "reward_before"):
        assert key in results, key
    # resumed from step 3 into another dir: steps 4-6 sample the same completions and log the same numbers
    _, resumed = _fit(tiny_tokenizer, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step_0000003"))
    strip = lambda m: {
        k: v for k, v in m.items() if not k.startswith("time/") and k not in ("wall_seconds", "tokens_per_s")
    }
    assert [strip(m) for m in resumed if m["step"] > 3] == [strip(m) for m in metrics if m["step"] > 3]
