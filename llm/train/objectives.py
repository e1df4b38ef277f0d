"""Objectives: what a task computes from a batch, through the interface of `llm.contract.Objective`.

`loss` returns (scalar loss to minimise, metrics dict of 0-d tensors). Metrics stay on the device; the trainer
averages them over micro-batches and reads them only on logging steps.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from llm.contract import (
    CHOSEN,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    MODEL_INPUTS,
    REJECTED,
    Objective,
    ref_logp_key,
    side_key,
)
from llm.dist.parallel import is_fsdp
from llm.errors import ConfigError, check_choice, check_int, check_number
from llm.eval import bpb
from llm.eval.exact_match import exact_match
from llm.model import router_terms, unwrap_model
from llm.peft import adapters_disabled, has_lora


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over labels != -100. logits [..., V], labels [...]."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


class LanguageModeling(Objective):
    """Next-token prediction: mean cross-entropy over every labelled position (labels of -100 are ignored).
    Validation also reports bits per byte (`val_bpb`, llm/eval/bpb.py) when the data has a bytes-per-token table.

    The model computes it with its fused LM head + cross-entropy (`llm/model/fused_loss.py`), loss_chunk_size
    tokens at a time (0 = auto), so the [tokens, vocab] logits never exist at once.

    `z_loss` > 0 adds z_loss x the mean squared log-sum-exp of the logits over the labelled tokens (PaLM's auxiliary
    loss: keeps the softmax normaliser near 1, the logits from drifting); logged as `z_loss`, `loss` stays the NLL.
    The fused head computes it in the same chunked pass (its gradient folded into the one it forms), so it costs no
    logits' memory; a head that is not fused (soft-capped logits) computes it on its full logits. Validation is
    unchanged. A mixture-of-experts model's balancing terms join the loss the same way (`with_router_terms`).
    """

    def __init__(self, loss_chunk_size: int = 0, z_loss: float = 0.0):
        self.loss_chunk_size = check_int("task.objective.loss_chunk_size", loss_chunk_size, 0)
        self.z_loss = check_number("task.objective.z_loss", z_loss, 0)
        self.token_bytes = None  # bytes per token id, on the device, when the data has the table

    def setup(self, model, data) -> None:
        self.token_bytes = bpb.byte_table(data, next(unwrap_model(model).parameters()).device)

    def _nll(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL of the labelled tokens, mean NLL)."""
        kwargs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        labels = batch[LABELS]
        nll = model(batch[INPUT_IDS], labels=labels, loss_chunk_size=self.loss_chunk_size, **kwargs)
        return nll, nll / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.z_loss:
            return with_router_terms(model, *self._loss_with_z(model, batch))
        _, loss = self._nll(model, batch)
        return with_router_terms(model, loss, {"loss": loss.detach()})

    def _loss_with_z(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean NLL + z_loss x mean lse^2 of the labelled tokens, from the model's loss pass (fused if its head is)."""
        kwargs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        labels = batch[LABELS]
        total, nll, z = model(
            batch[INPUT_IDS], labels=labels, loss_chunk_size=self.loss_chunk_size, z_loss=self.z_loss, **kwargs
        )
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        return total / count, {"loss": nll / count, "z_loss": z / count}

    def val_metrics(self, model, batch: dict) -> dict:
        """The loss, and with a bytes table the summed nats and bytes that `summarize` turns into `bpb`."""
        nll, _ = self._nll(model, batch)
        return bpb.nll_metrics(nll, batch[LABELS], self.token_bytes)

    def summarize(self, metrics: dict) -> dict:
        return bpb.summarize(metrics)


def with_router_terms(model, loss: torch.Tensor, metrics: dict, terms=None) -> tuple[torch.Tensor, dict]:
    """A mixture-of-experts model's balancing terms from the forward just run (or `terms`, taken by
    `policy_router_terms` earlier), added as the z-loss is: the penalty (model.moe.balance=aux_loss: aux_loss_coef x
    the load-balancing loss; + z_loss_coef x the router z-loss) joins the loss, the logged `loss` stays the
    objective's own (the NLL, the preference or policy loss), and the router's metrics (`moe/aux_loss`,
    `moe/router_z_loss`, `moe/load_imbalance`, `moe/dropped_tokens`) are logged. A dense model: unchanged."""
    terms = policy_router_terms(model) if terms is None else terms
    if terms is None:
        return loss, metrics
    penalty, router = terms
    return loss + penalty, {**metrics, **router}


def policy_router_terms(model) -> tuple[torch.Tensor, dict] | None:
    """(penalty, metrics) of the model's last forward, None for a dense model. An objective that runs another
    forward of the same model after the policy's (DPO's reference with LoRA: the adapters off) takes them in
    between: each forward replaces the router's record."""
    plain = unwrap_model(model)
    moe = getattr(plain.config, "moe", None)
    return None if moe is None else router_terms(plain, moe)


class SFT(LanguageModeling):
    """Supervised fine-tuning: the language-modelling loss on assistant tokens only (the data sets labels to -100
    elsewhere), plus exact match of greedy replies on held-out prompts at every evaluation."""

    def __init__(self, loss_chunk_size: int = 0, max_new_tokens: int = 32):
        super().__init__(loss_chunk_size)
        self.max_new_tokens = check_int("task.objective.max_new_tokens", max_new_tokens, 1)

    def evaluate(self, model, data) -> dict:
        return {"exact_match": exact_match(model, data.tokenizer, data.eval_examples, self.max_new_tokens)}


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label | prefix) over the labelled (response) tokens of each row: [B, T] -> [B]."""
    return -model(input_ids, labels=labels, reduction="none").sum(dim=-1)  # per-token NLL [B, T], 0 where ignored


def _pair_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected stacked on the batch dim -> (chosen [B], rejected [B])."""
    ids = torch.cat([batch[side_key(CHOSEN, INPUT_IDS)], batch[side_key(REJECTED, INPUT_IDS)]])
    labels = torch.cat([batch[side_key(CHOSEN, LABELS)], batch[side_key(REJECTED, LABELS)]])
    return sequence_logps(model, ids, labels).chunk(2)


def preference_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict]:
    """DPO-family losses on summed response log-probs, each [B]. h = (log pi/ref)(chosen) - (log pi/ref)(rejected).

    sigmoid (DPO, Rafailov et al. 2023): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo (Azar et al. 2023):              (h - 1/(2 beta))^2
    hinge (SLiC, Zhao et al. 2023):      max(0, 1 - beta h)
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(loss_type)
    rewards_chosen, rewards_rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "loss": losses.mean().detach(),
        "rewards/chosen": rewards_chosen.mean(),
        "rewards/rejected": rewards_rejected.mean(),
        "rewards/margin": (rewards_chosen - rewards_rejected).mean(),
        "rewards/accuracy": (rewards_chosen > rewards_rejected).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics


class DPO(Objective):
    """Direct preference optimisation against a frozen reference (the starting weights).

    sft_weight > 0 adds that times the mean negative log-likelihood of the chosen response tokens (RPO, Pang et
    al. 2024), which keeps the chosen answers likely while the margin grows (plain DPO lets both fall).

    reference=precomputed: before training, the reference log-probs of every train and validation pair are
    computed once (batched, no gradient) and stored with the samples — no second model in memory. They are
    computed from the starting weights again on resume (setup runs before a checkpoint is restored), which
    gives the same numbers. reference=live: a frozen copy of the starting model scores each batch.
    With LoRA (llm.peft) the reference is the policy itself with its adapters off: the base, no second copy.
    Chosen and rejected go through the policy in one concatenated forward pass; a mixture-of-experts policy's
    balancing terms (`with_router_terms`) are those of that forward, taken before any reference forward.
    """

    LOSSES = ("sigmoid", "ipo", "hinge")

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference: str = "precomputed",
        sft_weight: float = 0.0,
        max_new_tokens: int = 32,
        ref_batch_size: int = 32,
    ):
        check_choice("task.objective.loss_type", loss_type, set(self.LOSSES))
        check_choice("task.objective.reference", reference, {"precomputed", "live"})
        check_number("task.objective.beta", beta, 0, low_open=True)
        check_number("task.objective.label_smoothing", label_smoothing, 0, 0.5, high_open=True)
        check_int("task.objective.max_new_tokens", max_new_tokens, 1)
        check_int("task.objective.ref_batch_size", ref_batch_size, 1)
        self.beta, self.loss_type, self.label_smoothing, self.reference = beta, loss_type, label_smoothing, reference
        check_number("task.objective.sft_weight", sft_weight, 0)
        self.sft_weight, self.max_new_tokens, self.ref_batch_size = sft_weight, max_new_tokens, ref_batch_size
        self.ref_model, self.lora = None, False

    def describe_step(self, batch_size: int, seq_len: int, micro_batch_size: int, accum_steps: int) -> str:
        """trainer.batch_size counts preference pairs: each is two sequences through the policy."""
        return (
            f"{batch_size} preference pairs (chosen and rejected: {2 * batch_size} sequences) x {seq_len} tokens "
            f"({accum_steps} micro-batch(es) of {micro_batch_size} pairs per rank)"
        )

    def setup(self, model, data) -> None:
        plain = unwrap_model(model)
        self.lora = has_lora(plain)
        if self.reference == "live" and self.lora:
            return  # `_reference_logps`: the same model, adapters off
        if self.reference == "live":
            if is_fsdp(plain):  # a sharded module cannot be deep-copied (and a full copy per rank defeats sharding)
                raise ConfigError(
                    "task.objective.reference=live does not work with trainer.strategy=fsdp; use "
                    "reference=precomputed (the default) or trainer.strategy=ddp"
                )
            self.ref_model = copy.deepcopy(plain).eval().requires_grad_(False)
            return
        device = next(plain.parameters()).device
        was_training = plain.training
        plain.eval()
        with torch.no_grad(), adapters_disabled(plain):
            for ds in (data.train, data.val):
                for start in range(0, len(ds), self.ref_batch_size):
                    items = [ds[i] for i in range(start, min(len(ds), start + self.ref_batch_size))]
                    batch = {k: v.to(device) for k, v in ds.collate(items).items()}
                    chosen, rejected = self._logps(plain, batch)
                    for item, c, r in zip(items, chosen.tolist(), rejected.tolist()):
                        item[ref_logp_key(CHOSEN)], item[ref_logp_key(REJECTED)] = c, r
        plain.train(was_training)

    _logps = staticmethod(_pair_logps)

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        policy_chosen, policy_rejected = self._logps(model, batch)
        router = policy_router_terms(model)  # the policy's routing only: taken before a reference forward
        if self.ref_model is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected = self._logps(self.ref_model, batch)
        elif self.reference == "live":  # LoRA: the base is the policy with its adapters off
            with torch.no_grad(), adapters_disabled(unwrap_model(model)):
                ref_chosen, ref_rejected = self._logps(model, batch)
        else:
            ref_chosen, ref_rejected = batch[ref_logp_key(CHOSEN)], batch[ref_logp_key(REJECTED)]
        loss, metrics = preference_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing
        )
        if self.sft_weight:
            nll = -policy_chosen.sum() / (batch[side_key(CHOSEN, LABELS)] != IGNORE_INDEX).sum().clamp(min=1)
            loss = loss + self.sft_weight * nll
            metrics["nll/chosen"] = nll.detach()
            metrics["loss"] = loss.detach()
        return with_router_terms(model, loss, metrics, router)  # a MoE policy keeps balancing (TRL's aux_loss too)

    def evaluate(self, model, data) -> dict:
        """Over every held-out pair: preference accuracy and mean reward margin (policy vs reference), and exact
        match of greedy replies against the chosen answers."""
        device = next(unwrap_model(model).parameters()).device
        margins = []
        for start in range(0, len(data.val), self.ref_batch_size):
            batch = data.val.collate(
                [data.val[i] for i in range(start, min(len(data.val), start + self.ref_batch_size))]
            )
            _, metrics_margin = self.loss(model, {k: v.to(device) for k, v in batch.items()})
            margins.append(
                (
                    metrics_margin["rewards/accuracy"],
                    metrics_margin["rewards/margin"],
                    batch[side_key(CHOSEN, INPUT_IDS)].size(0),
                )
            )
        n = sum(m[2] for m in margins)
        return {
            "preference_accuracy": float(sum(a * k for a, _, k in margins) / n),
            "reward_margin": float(sum(r * k for _, r, k in margins) / n),
            "exact_match": exact_match(model, data.tokenizer, data.eval_examples, self.max_new_tokens),
        }
