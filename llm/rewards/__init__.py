"""Rewards for reinforcement learning on verifiable answers (task=grpo): plain functions of
(prompts, completions, rows) -> one number per completion, and the machinery that loads and checks them.

Built in: `exact_match`, `numeric_match` (a number within a tolerance), `format_check` (a pattern and a length).
A user's own reward is any importable function with the same signature, named in `task.rewards` by its dotted
path (`{_target_: my_module.my_reward, weight: 0.5}`). This room imports no other room of `llm` but the errors:
a reward sees strings and rows, never a model or a tensor.
"""

from llm.rewards.builtin import exact_match, format_check, numeric_match
from llm.rewards.scoring import Reward, load_rewards, score

__all__ = ["Reward", "exact_match", "format_check", "load_rewards", "numeric_match", "score"]
