"""GRPO (Shao et al. 2024, DeepSeekMath): reinforcement learning on verifiable rewards, as an objective of the one
training loop.

Each optimizer step, `prepare` samples `group_size` completions for each prompt of the step's batch with the
model's KV-cache generation (one left-padded batch, each row stopping at the chat template's end token), scores
them with the rewards (llm/rewards), turns each group's rewards into advantages and lays the prompt + completion
tokens out as a training batch (labels on the completion tokens only). `loss` is the clipped policy-ratio
objective of llm/train/grpo_loss.py over that batch (+ a mixture-of-experts policy's balancing terms, as in
pretraining); the trainer takes `inner_steps` optimizer steps on it.

pi_old (the policy that sampled) is the model at `prepare`: with one inner step its log-probs equal the current
ones (taken detached, no extra forward); with more they are computed once in `prepare`. With beta > 0 a frozen
copy of the starting model gives the reference log-probs of the KL term (with LoRA: the policy with its adapters
off, no copy); with beta = 0 no reference exists.
Sampling draws from a generator seeded by (seed, step, the batch's prompt indices): a resumed run samples exactly
what the uninterrupted run did, with no RNG state to save, and every rank (its own prompts) samples its own.
"""

from __future__ import annotations

import copy
import math
import zlib

import torch
import torch.nn.functional as F

from llm.contract import IGNORE_INDEX, INPUT_IDS, LABELS, MAX_METRIC, SUM_METRIC, Objective
from llm.data.chat import stop_token_id
from llm.dist.parallel import get_rank, get_world_size, is_fsdp, reduce_sums
from llm.errors import ConfigError, check_choice, check_int, check_number
from llm.eval.sampling import sample_completions
from llm.model import unwrap_model
from llm.peft import adapters_disabled, has_lora
from llm.rewards import load_rewards, score
from llm.train.grpo_loss import LOSS_TYPES, group_advantages, policy_loss
from llm.train.objectives import with_router_terms

ADVANTAGES, OLD_LOGPS, REF_LOGPS = "advantages", "old_logps", "ref_logps"
TOKEN_COUNT = "token_count"  # dapo: the step's completion tokens per micro-batch (over all micro-batches and ranks)
STATS = "stats/"  # batch keys of per-completion statistics, turned into metrics by `loss`


def token_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(label | prefix) of each labelled token, 0 elsewhere: [N, T] -> [N, T]. At temperature 1 through the
    model's fused head + cross-entropy (no [N, T, V] logits); otherwise from the logits divided by the temperature
    (the distribution the completions were sampled from)."""
    if temperature == 1.0:
        return -model(input_ids, labels=labels, reduction="none")
    logits = model(input_ids).float() / temperature  # [N, T, V]
    logp = torch.gather(F.log_softmax(logits, dim=-1), -1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * (labels != IGNORE_INDEX)


def sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """prompt + completion per row, padded on the right -> input_ids, labels [N, T] (labels on completion tokens)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows) - 1
    ids = [r[:-1] + [pad_id] * (T + 1 - len(r)) for r in rows]
    labels = [
        [IGNORE_INDEX] * (len(p) - 1) + c + [IGNORE_INDEX] * (T + 1 - len(p) - len(c))
        for p, c in zip(prompts, completions)
    ]
    return {INPUT_IDS: torch.tensor(ids), LABELS: torch.tensor(labels)}


class GRPO(Objective):
    generates = True

    def __init__(
        self,
        rewards=(),
        group_size: int = 8,
        loss_type: str = "grpo",
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        inner_steps: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        max_new_tokens: int = 32,
        eval_max_new_tokens: int | None = None,
        seed: int = 0,
    ):
        self.group_size = check_int("task.objective.group_size", group_size, 2)
        check_choice("task.objective.loss_type", loss_type, set(LOSS_TYPES))
        self.beta = check_number("task.objective.beta", beta, 0)
        self.epsilon = check_number("task.objective.epsilon", epsilon, 0, 1, low_open=True, high_open=True)
        self.epsilon_high = check_number("task.objective.epsilon_high", epsilon_high, 0, low_open=True, allow_none=True)
        self.inner_steps = check_int("task.objective.inner_steps", inner_steps, 1)
        self.temperature = check_number("task.objective.temperature", temperature, 0, low_open=True)
        self.top_p = check_number("task.objective.top_p", top_p, 0, 1, low_open=True)
        self.top_k = check_int("task.objective.top_k", top_k, 1, allow_none=True)
        self.max_new_tokens = check_int("task.objective.max_new_tokens", max_new_tokens, 1)
        self.eval_max_new_tokens = check_int(
            "task.objective.eval_max_new_tokens",
            max_new_tokens if eval_max_new_tokens is None else eval_max_new_tokens,
            1,
        )  # 0 is refused, not taken for null
        self.loss_type, self.seed = loss_type, seed
        self.rewards = load_rewards(list(rewards)) if rewards and isinstance(rewards[0], dict) else list(rewards)
        if not self.rewards:
            raise ConfigError(
                "task.rewards is empty: name at least one reward, e.g. [{_target_: llm.rewards.exact_match}]"
            )
        self.tokenizer = self.ref_model = None
        self.base_reference = False
        self.stop_id = self.pad_id = None

    def setup(self, model, data) -> None:
        plain = unwrap_model(model)
        if is_fsdp(plain):  # ranks stop generating at different steps: FSDP's all-gathers would not line up
            raise ConfigError("task=grpo does not work with trainer.strategy=fsdp yet; use ddp or single")
        self.check_fits(plain.config.max_seq_len, data)
        self.tokenizer = data.tokenizer
        self.stop_id = stop_token_id(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_id
        self.base_reference = bool(self.beta) and has_lora(plain)  # LoRA: the base is the policy, adapters off
        if self.beta and not self.base_reference:  # the KL's reference: the starting weights, frozen (setup runs
            self.ref_model = copy.deepcopy(plain).eval().requires_grad_(False)  # before a resume restores)

    def check_fits(self, max_seq_len: int, data) -> None:
        """Before any step: the longest prompt plus the completion it may get fits the model's context (the
        training batch lays them out as one sequence), for the training and for the held-out prompts."""
        for key, new_tokens, rows, which in (
            ("max_new_tokens", self.max_new_tokens, data.train.items, "training"),
            ("eval_max_new_tokens", self.eval_max_new_tokens, data.eval_rows, "held-out"),
        ):
            longest = max((len(r["prompt_ids"]) for r in rows), default=0)
            if longest + new_tokens > max_seq_len:
                keep = max_seq_len - new_tokens
                raise ConfigError(
                    f"task.objective.{key}={new_tokens} + the longest {which} prompt ({longest} tokens) = "
                    f"{longest + new_tokens} positions, more than model.max_seq_len={max_seq_len}: lower "
                    f"task.objective.{key}, "
                    + (f"leave the longer prompts out (task.data.max_prompt_tokens={keep}), " if keep > 0 else "")
                    + "or raise model.max_seq_len"
                )

    def describe_step(self, batch_size: int, seq_len: int, micro_batch_size: int, accum_steps: int) -> str:
        """A step samples group_size completions of each of batch_size prompts, then trains on them."""
        updates = "1 optimizer step" if self.inner_steps == 1 else f"{self.inner_steps} optimizer steps"
        return (
            f"{batch_size} prompts x {self.group_size} completions = {batch_size * self.group_size} samples of at "
            f"most {self.max_new_tokens} new tokens (temperature {self.temperature:g}) and {updates} on them "
            f"({accum_steps} micro-batch(es) of {micro_batch_size} prompts per rank, each prompt's group on one rank)"
        )

    # ------------------------------------------------------------------ sampling and scoring
    def _generator(self, device, step: int, indices: list[int]) -> torch.Generator:
        seed = zlib.crc32(f"{self.seed}|{step}|{indices}".encode())
        return torch.Generator(device=device).manual_seed(seed)

    def _complete(self, model, prompt_ids, temperature, max_new_tokens, generator=None, samples=1):
        """(completions: token lists and finished flags, `samples` per prompt; their texts without the stop token)."""
        out = sample_completions(
            model,
            prompt_ids,
            max_new_tokens,
            self.stop_id,
            self.pad_id,
            temperature,
            self.top_p,
            self.top_k,
            generator,
            samples=samples,
        )
        texts = [
            self.tokenizer.decode(ids[:-1] if done else ids, skip_special_tokens=True)
            for ids, done in zip(out.ids, out.finished)
        ]
        return out, texts

    def prepare(self, model, batch: dict, step: int) -> dict:
        G, raw = self.group_size, unwrap_model(model)
        device = next(raw.parameters()).device
        each = lambda key: [x for x in batch[key] for _ in range(G)]  # each prompt's G completions adjacent
        prompts = each("prompt_ids")
        out, texts = self._complete(
            raw,
            batch["prompt_ids"],
            self.temperature,
            self.max_new_tokens,
            self._generator(device, step, batch["index"]),
            samples=G,
        )
        totals, per_reward = score(self.rewards, each("prompt"), texts, each("rows"), each("where"))
        rewards = torch.tensor(totals)
        advantages, zero = group_advantages(rewards, G, scale=self.loss_type != "dr_grpo")
        new = {k: v.to(device) for k, v in sequences(prompts, out.ids, self.pad_id).items()}
        new[ADVANTAGES] = advantages.to(device)
        with torch.no_grad():
            if self.inner_steps > 1:  # pi_old, before the first of the inner steps changes the policy
                new[OLD_LOGPS] = token_logps(raw, new[INPUT_IDS], new[LABELS], self.temperature)
            if self.ref_model is not None or self.base_reference:
                with adapters_disabled(raw):  # a no-op without LoRA
                    ref = self.ref_model if self.ref_model is not None else raw
                    new[REF_LOGPS] = token_logps(ref, new[INPUT_IDS], new[LABELS], self.temperature)
        lengths = torch.tensor(out.lengths, dtype=torch.float32)
        stats = {
            "rewards": rewards,
            "length": lengths,
            "cut": 1.0 - torch.tensor(out.finished, dtype=torch.float32),
            "zero_variance": zero.float(),
        }
        stats.update({f"reward/{name}": torch.tensor(v) for name, v in per_reward.items()})
        new.update({STATS + k: v.to(device) for k, v in stats.items()})
        return new

    def prepare_step(self, batches: list[dict]) -> list[dict]:
        """dapo's token mean is over the whole step: each micro-batch's loss divides its token sum by the step's
        completion tokens per micro-batch (summed over this rank's micro-batches and every rank, one collective),
        so that the trainer's mean over micro-batches and the ranks' mean gradient give the step's token mean."""
        if self.loss_type != "dapo":
            return batches  # grpo, dr_grpo: normalisers that are the same in every micro-batch (policy_loss)
        tokens = sum((b[LABELS] != IGNORE_INDEX).sum() for b in batches).float()
        sums, count = reduce_sums({"tokens": tokens}, len(batches))  # over ranks
        per_batch = sums["tokens"] / count
        return [{**b, TOKEN_COUNT: per_batch} for b in batches]

    # ------------------------------------------------------------------ loss and evaluation
    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logps = token_logps(model, batch[INPUT_IDS], batch[LABELS], self.temperature)
        mask = batch[LABELS] != IGNORE_INDEX
        old = batch[OLD_LOGPS] if OLD_LOGPS in batch else logps.detach()
        loss, metrics = policy_loss(
            logps,
            old,
            batch[ADVANTAGES],
            mask,
            self.loss_type,
            self.epsilon,
            self.epsilon_high,
            self.beta,
            batch.get(REF_LOGPS),
            self.max_new_tokens,
            batch.get(TOKEN_COUNT),
        )
        # a MoE policy keeps balancing: the routing of this forward (sampling and pi_old / reference log-probs ran
        # without gradient in `prepare` and count no load)
        return with_router_terms(model, loss, {**metrics, **self.batch_metrics(batch)})

    @staticmethod
    def batch_metrics(batch: dict) -> dict[str, torch.Tensor]:
        """What the sampled batch says, as sums over its samples (and the longest completion) that the trainer
        adds up over the step's micro-batches, the log line's steps and the ranks; `summarize_train` then gives
        the rewards' (total and each function's) mean and std, the completion lengths' mean, the longest, the
        share cut at max_new_tokens and the share of groups whose rewards were all equal: exact over every sample
        of every rank, not means of per-batch statistics."""
        s = {k[len(STATS) :]: v.float() for k, v in batch.items() if k.startswith(STATS)}
        out = {
            # counts filled on the device (torch.tensor(n, device=...) would copy from the host and wait: a sync
            # in every micro-batch's loss)
            "samples" + SUM_METRIC: s["rewards"].new_full((), s["rewards"].numel()),
            "groups" + SUM_METRIC: s["zero_variance"].new_full((), s["zero_variance"].numel()),
            "zero_variance_groups" + SUM_METRIC: s["zero_variance"].sum(),
            "completions/length" + SUM_METRIC: s["length"].sum(),
            "completions/max_length" + MAX_METRIC: s["length"].max(),
            "completions/cut" + SUM_METRIC: s["cut"].sum(),
        }
        for key, v in s.items():
            if key == "rewards" or key.startswith("reward/"):
                name = "rewards" if key == "rewards" else f"rewards/{key[len('reward/') :]}"
                out[name + SUM_METRIC], out[name + "/squares" + SUM_METRIC] = v.sum(), (v * v).sum()
        return out

    @staticmethod
    def summarize_train(metrics: dict[str, float]) -> dict[str, float]:
        """The sums of `batch_metrics` over the log line's samples turned into means, stds and shares."""
        m = dict(metrics)
        n, groups = m.pop("samples" + SUM_METRIC, 0.0), m.pop("groups" + SUM_METRIC, 0.0)
        if not n:
            return m
        out = {}
        for key in [k for k in m if k.startswith("rewards") and k.endswith(SUM_METRIC) and "/squares" not in k]:
            name = key.removesuffix(SUM_METRIC)
            mean = m.pop(key) / n
            square = m.pop(f"{name}/squares{SUM_METRIC}") / n
            out[f"{name}/mean"], out[f"{name}/std"] = mean, math.sqrt(max(square - mean * mean, 0.0))
        out["completions/mean_length"] = m.pop("completions/length" + SUM_METRIC) / n
        out["completions/max_length"] = m.pop("completions/max_length" + MAX_METRIC)
        out["completions/cut_fraction"] = m.pop("completions/cut" + SUM_METRIC) / n
        out["zero_variance_groups"] = m.pop("zero_variance_groups" + SUM_METRIC) / max(groups, 1.0)
        return {**m, **out}

    def val_metrics(self, model, batch: dict) -> dict:
        return {}  # no validation loss: held-out prompts are scored by `evaluate` (exact match, reward)

    @torch.no_grad()
    def evaluate(self, model, data) -> dict:
        """Greedy replies to the held-out prompts: exact match against their answers, and the mean total reward.
        Each rank answers its share of the prompts (every world_size-th), and the counts are summed over ranks."""
        rows = data.eval_rows
        if not rows:
            return {}
        raw = unwrap_model(model)  # ranks generate different lengths: no collective inside a forward
        mine = rows[get_rank() :: get_world_size()]
        match, reward = 0.0, 0.0
        if mine:
            _, texts = self._complete(raw, [r["prompt_ids"] for r in mine], 0.0, self.eval_max_new_tokens)
            totals, _ = score(
                self.rewards, [r["prompt"] for r in mine], texts, [r["rows"] for r in mine], [r["where"] for r in mine]
            )
            match = float(sum(t.strip() == str(r["rows"]["answer"]).strip() for t, r in zip(texts, mine)))
            reward = float(sum(totals))
        device = next(raw.parameters()).device
        sums, _ = reduce_sums(
            {"match": torch.tensor(match, device=device), "reward": torch.tensor(reward, device=device)}, 0
        )
        return {"exact_match": sums["match"].item() / len(rows), "reward": sums["reward"].item() / len(rows)}
