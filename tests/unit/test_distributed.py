"""The pure pieces of llm/dist/ (env, launch, signals, parallel): SLURM / submitit environment mapping, rank-aware Hydra
output subdir, the lockstep share of validation batches, strategy choice, stop signals agreed over ranks, and
single-process no-ops."""

from __future__ import annotations

import os
import time

import pytest
import torch

from llm.checkpoint import checkpointer
from llm.dist import env as C
from llm.dist import launch as L
from llm.dist import parallel as P
from llm.dist import signals as S
from llm.errors import ConfigError
from llm.rundir import resolvers as job

SLURM_TASK = {  # task 5 of a 2-node x 4-task srun step
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
}


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("gpu[017-018]", "gpu017"),
        ("gpu[3,5-7],cpu1", "gpu3"),
        ("node12", "node12"),
        ("a1,a2", "a1"),
        ("dgx-a100-[001-004]", "dgx-a100-001"),
    ],
)
def test_first_host(nodelist, first):
    assert C.first_host(nodelist) == first


def test_slurm_task_maps_to_torch_variables():
    env = C.slurm_env(SLURM_TASK)
    assert env == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu017",
        "MASTER_PORT": str(20000 + 123456 % 20000),
        "LOCAL_WORLD_SIZE": "4",
    }
    assert C.env_rank(SLURM_TASK) == 5 and C.env_world_size(SLURM_TASK) == 8
    # set by the user or the batch script: kept
    assert C.slurm_env({**SLURM_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"


@pytest.mark.parametrize(
    "change",
    [
        {"RANK": "0"},  # torchrun (under srun) already set the variables
        {"SLURM_STEP_ID": None},  # the batch script itself, not an srun step
        {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"},  # one task
    ],
)
def test_slurm_mapping_only_for_multi_task_steps(change):
    env = {k: v for k, v in {**SLURM_TASK, **change}.items() if v is not None}
    assert C.slurm_env(env) == {}
    assert C.env_rank(env) == int(env.get("RANK", 0))


def test_submitit_local_tasks_map_too():
    env = {
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "777",
    }
    assert C.cluster_env(env) == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "20777",
    }
    assert C.cluster_env({"SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_GLOBALID": "0"}) == {}


def test_only_rank_0_writes_hydra_subdir(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    for key in SLURM_TASK:
        monkeypatch.delenv(key, raising=False)
    assert job.hydra_output_subdir(".hydra") == ".hydra"
    monkeypatch.setenv("RANK", "1")
    assert job.hydra_output_subdir(".hydra") is None
    monkeypatch.setenv("RANK", "0")
    assert job.hydra_output_subdir(".hydra") == ".hydra"


def test_hydra_config_uses_the_rank_aware_resolvers(monkeypatch):
    from tests.conftest import compose_config

    monkeypatch.setenv("LLM_RUN_STAMP", "2001-02-03/04-05-06")
    monkeypatch.setenv("RANK", "1")
    hydra = compose_config(return_hydra_config=True).hydra
    assert hydra.run.dir == "outputs/2001-02-03/04-05-06"
    assert hydra.sweep.dir == "multirun_outputs/2001-02-03/04-05-06"
    assert hydra.output_subdir is None
    monkeypatch.delenv("LLM_RUN_STAMP")
    monkeypatch.setenv("RANK", "0")
    hydra = compose_config(return_hydra_config=True).hydra
    assert hydra.output_subdir == ".hydra" and hydra.run.dir.startswith("outputs/20")


@pytest.mark.parametrize("n,batch,world", [(32, 8, 2), (30, 8, 2), (8, 8, 2), (40, 4, 3), (5, 2, 4), (16, 4, 1)])
def test_eval_shard_covers_every_batch_once_in_lockstep(n, batch, world):
    shards = [list(P.eval_shard(n, batch, C.DistEnv(rank=r, world_size=world))) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of forwards
    real = sorted((start, w) for s in shards for start, w in s if w)
    assert real == [(s, min(n, s + batch) - s) for s in range(0, n, batch)]
    assert sum(w for s in shards for _, w in s) == n


def test_strategy_choice():
    assert P.resolve_strategy("auto", 1) == "single" and P.resolve_strategy("auto", 4) == "ddp"
    assert P.resolve_strategy("fsdp", 4) == "fsdp" and P.resolve_strategy("ddp", 1) == "single"
    with pytest.raises(ConfigError, match="trainer.strategy=single runs one process"):
        P.resolve_strategy("single", 2)
    with pytest.raises(ConfigError, match="not allowed"):
        P.resolve_strategy("zero3", 2)


def test_single_process_helpers_are_no_ops():
    metrics = {"loss": torch.tensor(2.0), "grad_norm": torch.tensor(1.0)}
    assert P.all_reduce_mean(metrics) is metrics
    sums, count = P.reduce_sums({"loss": torch.tensor(3.0)}, 4)
    assert count == 4 and sums["loss"].item() == 3.0
    model = torch.nn.Linear(3, 2)
    P.set_gradient_sync(model, False)  # a plain module: nothing to switch off
    model(torch.randn(4, 3)).sum().backward()
    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(model.state_dict())
    for p in (model, plain):
        p.zero_grad()
        p(torch.ones(1, 3)).pow(2).sum().backward()
    ref = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    assert torch.equal(P.clip_grad_norm_(model.parameters(), 0.5), ref)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters()))
    assert checkpointer.full_state(model, None) == (model, None)


def test_nested_launch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="trainer.nproc_per_node=2 inside an already distributed launch"):
        L.launch(print, 2, {}, "/tmp/x")


def _failed_save(rank: int, blocked_dir: str) -> str | None:
    """Rank 0 cannot write the checkpoint (its run dir is a file): every rank's save raises, none waits for ever."""
    from llm.errors import TrainingError
    from llm.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, d_model=8, max_seq_len=8))
    saver = checkpointer.Checkpointer(blocked_dir, None, None, is_main=rank == 0)
    try:
        saver.save(1, model, None, {"step": 1})
    except TrainingError as e:
        return str(e)
    return None


def _downstream(rank: int, world_size: int, tok_dir: str, rows: str) -> dict:
    """A downstream evaluation (llm/train/downstream.py) of a seeded tiny model on 7 items, this rank's share."""
    from llm.data.tokenizer import load_pretrained
    from llm.train.downstream import DownstreamEvals
    from tests.unit.test_downstream import tiny, toy_task

    tokenizer = load_pretrained(tok_dir)
    evals = DownstreamEvals({"t": toy_task(rows)}, batch_items=3)
    return evals.run(tiny(len(tokenizer)), tokenizer, rank=rank, world_size=world_size)


def _grpo_statistics(rank: int) -> dict:
    """A GRPO log line over two ranks, each with its own 4 samples (groups of 2) and a mean-type metric."""
    from llm.train.grpo import GRPO
    from llm.train.loggers import MetricsWindow

    rewards, lengths = ([0.0, 0.0, 1.0, 1.0], [2, 3, 4, 5]) if rank == 0 else ([1.0, 1.0, 1.0, 0.0], [8, 1, 1, 1])
    stats = {
        "stats/rewards": torch.tensor(rewards),
        "stats/length": torch.tensor(lengths, dtype=torch.float32),
        "stats/cut": torch.zeros(4),
        "stats/zero_variance": torch.tensor([float(rewards[0] == rewards[1]), float(rewards[2] == rewards[3])]),
    }
    window = MetricsWindow(torch.device("cpu"), summarize=GRPO.summarize_train)
    window.add({"loss": torch.tensor(float(rank)), **GRPO.batch_metrics(stats)}, tokens=1)
    return window.mean()


def _stop_flag_worker(rank: int, port: int, signalled_rank: int, out, blocked_dir: str, evals: tuple):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        agreed = (P.rank0_succeeded(rank == 0), P.rank0_succeeded(rank != 0))  # rank 0's word, on both ranks
        failed_save = _failed_save(rank, blocked_dir)
        quiet = S.StopSignals().agreed(2, torch.device("cpu"))
        finish = S.StopSignals()
        if rank == 0:
            finish.finish("pruned")  # rank 0's decision (a sweep's pruner), agreed by every rank
        finished = finish.agreed(2, torch.device("cpu"))
        stop = S.StopSignals()
        if rank == signalled_rank:
            stop.received = "SIGTERM"
            stop.finish("pruned")  # a signal wins over an early finish
        logged, downstream = _grpo_statistics(rank), _downstream(rank, 2, *evals)
        agreed_stop = stop.agreed(2, torch.device("cpu"))
        out.put((rank, quiet, finished, agreed_stop, stop.received, agreed, failed_save, logged, downstream))
    finally:
        dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank(tmp_path, tiny_tokenizer):
    """SIGTERM reaching rank 1 only: both ranks agree to stop after the same step (rank 0 names the peer). And a
    checkpoint rank 0 cannot write fails the save on both ranks (rank 1 does not wait at a barrier for ever). And
    GRPO's logged statistics are over every rank's samples. And (sharing the spawned ranks) a downstream
    evaluation over 2 ranks, gathered, equals one process's."""
    from tests.unit.test_downstream import mc_rows, write_jsonl

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    evals = (str(tmp_path / "tok"), write_jsonl(tmp_path / "rows.jsonl", mc_rows(7)))
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    blocked = tmp_path / "run"
    blocked.write_text("a file where the run dir should be")
    procs = [ctx.Process(target=_stop_flag_worker, args=(r, port, 1, out, str(blocked), evals)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    go_on, finish, preempt = S.StopSignals.GO_ON, S.StopSignals.FINISH, S.StopSignals.PREEMPT
    assert [r[:5] for r in results] == [
        (0, go_on, finish, preempt, "peer rank"),
        (1, go_on, finish, preempt, "SIGTERM"),
    ]
    assert [r[5] for r in results] == [(True, False), (True, False)]
    assert "could not be written" in results[0][6] and "rank 0 could not write the checkpoint" in results[1][6]
    # a GRPO log line: statistics over both ranks' samples (std of all 8, the longest of all), means of the means
    everyone = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    for logged in (r[7] for r in results):
        assert logged["loss"] == 0.5 and logged["completions/max_length"] == 8.0
        assert logged["rewards/mean"] == pytest.approx(0.625) and logged["zero_variance_groups"] == 0.75
        assert logged["rewards/std"] == pytest.approx(everyone.std(correction=0).item())
    single = _downstream(0, 1, *evals)
    assert set(single) == {"eval/t/acc", "eval/t/acc_norm", "eval/t/bpb", "eval/t/centered", "eval/core"}
    assert results[0][8] == pytest.approx(single, abs=1e-6) and results[1][8] == pytest.approx(single, abs=1e-6)


def test_each_error_line_printed_once_per_machine(tmp_path, monkeypatch):
    """Under torchrun / srun every rank usually ends with the same line: the first rank of this launch on this
    machine to end with it prints it; another line is printed too; one process alone always prints. The failed
    launch leaves nothing behind in the temp dir (no `llm-error-*` marker files)."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    stamp = f"test-{os.getpid()}-{time.time_ns()}"  # this test's launches only (other test runs share the machine)
    ranks = {"WORLD_SIZE": "2", "LLM_RUN_STAMP": stamp}
    assert C.first_to_report("error: model.n_head=0", ranks)
    assert not C.first_to_report("error: model.n_head=0", ranks)  # the other rank, same line
    assert C.first_to_report("error: out of memory", ranks)  # its own line
    assert C.first_to_report("error: model.n_head=0", {**ranks, "LLM_RUN_STAMP": stamp + "-next"})  # next launch
    assert C.first_to_report("error: x", {}) and C.first_to_report("error: x", {})  # no launch: always
    assert list(tmp_path.iterdir()) == []
