"""task=grpo through the one training loop, in-process on a tiny model: the reward rises within a few steps, the
run writes the GRPO metrics and the before/after evaluation, a resumed run samples and trains exactly as the
uninterrupted one did, and 2 DDP ranks (gloo, spawned) train as one process does, for each loss variant."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file

from llm.data import PromptData, VerifiableTasks
from llm.data.chat import stop_token_id
from llm.model import build_gpt
from llm.train import RunInfo, Trainer, trainer_settings
from llm.train.grpo import GRPO
from llm.train.grpo_loss import LOSS_TYPES
from llm.train.optim import OptimizerConfig

REWARD = [{"_target_": "tests.unit.test_grpo.digits", "per_char": False}]  # a user's function: any digit in the reply


def _model(tokenizer, stop_logit: float):
    """The tiny model; stop_logit > 0 (a LayerNorm model) adds about that to the stop token's logit, so that
    completions end at different lengths: the final norm's bias becomes a unit vector orthogonal to every
    normalised hidden state (they have zero mean) and the stop token's head row gets stop_logit times it."""
    norm = {"norm": "layernorm", "bias": True} if stop_logit else {}
    model = build_gpt(
        vocab_size=len(tokenizer) + 4, n_layer=1, n_head=2, n_kv_head=2, d_model=32, max_seq_len=64, **norm
    )
    if stop_logit:
        with torch.no_grad():
            model.norm_f.bias.fill_(32**-0.5)
            model.lm_head.weight[stop_token_id(tokenizer)] += stop_logit * model.norm_f.bias
    return model


def _fit(tokenizer, run_dir, steps=6, save_every=0, resume=None, micro_batch_size=None, **kw):
    """A tiny GRPO run (kw: loss_type, lr, stop_logit); (results, metrics.jsonl's lines, None on a rank but 0)."""
    torch.manual_seed(0)
    data = PromptData(
        tokenizer,
        VerifiableTasks(tasks=["count"], num_examples=64),
        VerifiableTasks(split="heldout", tasks=["count"], num_examples=8),
    )
    model = _model(tokenizer, kw.get("stop_logit", 0.0))
    objective = GRPO(rewards=REWARD, group_size=8, max_new_tokens=4, seed=3, loss_type=kw.get("loss_type", "grpo"))
    settings = trainer_settings(
        max_steps=steps,
        batch_size=4,
        micro_batch_size=micro_batch_size,
        seq_len=64,
        eval_every=steps,
        log_every=1,
        save_every=save_every,
        progress=False,
        device="cpu",
    )
    optim = OptimizerConfig(lr=kw.get("lr", 0.1), warmup_steps=0, weight_decay=0.0, schedule="constant")
    run = RunInfo(str(run_dir), task="grpo", seed=0, resume=resume)
    results = Trainer(model, data, objective, optim, settings, run, tokenizer=tokenizer).fit()
    if os.environ.get("RANK", "0") != "0":  # only rank 0 writes the run's files
        return results, None
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


# ---------------------------------------------------------------------------------------------- DDP
# What must be equal, and why. Each rank samples the groups of its own prompts (the sampler gives rank r the r-th
# contiguous share of the step's prompts); the sampling generator is seeded by (seed, step, the micro-batch's
# prompt indices), so the one-process run takes micro-batches of the same 2 prompts as each rank's share
# (trainer.micro_batch_size=2): both runs then sample the same completions, score them the same, and normalise
# advantages within the same groups (a group never spans ranks). The gradient: one process averages its 2
# micro-batches' losses, DDP averages the 2 ranks' gradients; each loss type's normaliser makes that mean the whole
# batch's loss (grpo: the same number of sequences per micro-batch; dr_grpo: a constant; dapo: the step's token
# count over micro-batches and ranks, GRPO.prepare_step). Equal up to float summation order (TOL): the logged
# metrics of every step (rewards, loss, gradient norm, clip fraction, held-out exact match) and the final weights.
# And the ranks' checkpoint resumes in one process: the sampling generator needs no state beyond the step.
TOL = 1e-5
DDP_STEPS = 3
DDP = {"steps": DDP_STEPS, "lr": 0.02, "stop_logit": 3.0}  # completions of 1-4 tokens: ranks' token counts differ


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "LLM_DIST_TIMEOUT_MIN": "1",  # a failing rank must not leave the other waiting for 30 minutes
    }


def _ddp_runs(tokenizer, root) -> dict:
    """This rank's runs, the three loss types in turn in one process group: {loss_type: metrics (rank 0)}."""
    from llm.dist.env import shutdown

    try:
        return {lt: _fit(tokenizer, root / lt, save_every=2, loss_type=lt, **DDP)[1] for lt in LOSS_TYPES}
    finally:
        shutdown()


def _peer(port: int, tokenizer, root, out) -> None:
    """Rank 1, in a spawned process (rank 0 is the test's own: one process to start instead of two)."""
    os.environ.update(_rank_env(1, port))
    torch.set_num_threads(1)
    try:
        _ddp_runs(tokenizer, root)
        out.put("ok")
    except Exception as e:  # the test reports it rather than waiting for a result that never comes
        out.put(f"{type(e).__name__}: {e}")


def _comparable(metrics: list[dict]) -> list[dict]:
    return [
        {
            k: v
            for k, v in m.items()
            if not k.startswith("time/") and k not in ("wall_seconds", "tokens_per_s", "tokens")
        }
        for m in metrics
    ]  # tokens: the trainer counts rank 0's padded batch x ranks, and the ranks pad their completions differently


@pytest.fixture
def one_thread():
    """Every run of the comparison on one torch thread, as the spawned rank: the same kernels, summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_ddp_ranks_train_as_one_process(tiny_tokenizer, tmp_path, monkeypatch, one_thread):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    peer = ctx.Process(target=_peer, args=(port, tiny_tokenizer, tmp_path / "ddp", out))
    peer.start()
    for key, value in _rank_env(0, port).items():
        monkeypatch.setenv(key, value)
    ddp, error = {}, None
    try:
        ddp = _ddp_runs(tiny_tokenizer, tmp_path / "ddp")
    except Exception as e:  # reported with rank 1's word below
        error = f"{type(e).__name__}: {e}"
    peer.join(timeout=60)
    if peer.is_alive():
        peer.kill()
    assert (error, out.get(timeout=5) if peer.exitcode == 0 else f"exit code {peer.exitcode}") == (None, "ok")
    for key in _rank_env(0, port):
        monkeypatch.delenv(key)  # the one-process runs
    for loss_type in LOSS_TYPES:
        _, single = _fit(tiny_tokenizer, tmp_path / "one" / loss_type, micro_batch_size=2, loss_type=loss_type, **DDP)
        a, b = _comparable(single), _comparable(ddp[loss_type])
        assert [sorted(m) for m in a] == [sorted(m) for m in b]
        for x, y in zip(a, b):
            assert x == pytest.approx(y, rel=TOL, abs=TOL), (loss_type, x, y)
        last = f"checkpoints/step_{DDP_STEPS:07d}/model.safetensors"
        w1, w2 = (load_file(str(tmp_path / d / loss_type / last)) for d in ("one", "ddp"))
        assert all(torch.allclose(w1[k], w2[k], rtol=0, atol=TOL) for k in w1), loss_type
    # the 2 ranks' checkpoint of step 2 resumed in one process: step 3 samples and trains as the 2 ranks did
    step_2 = str(tmp_path / "ddp" / "grpo" / "checkpoints" / "step_0000002")
    _, resumed = _fit(tiny_tokenizer, tmp_path / "resumed", resume=step_2, micro_batch_size=2, **DDP)
    assert _comparable(resumed)[-1] == pytest.approx(_comparable(ddp["grpo"])[-1], rel=TOL, abs=TOL)
