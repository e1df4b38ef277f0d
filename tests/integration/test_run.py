"""run.py end to end in a subprocess: the run-dir contract, learning, checkpoints that load back, init_from,
exact resume, sweeps, loggers and one-line errors."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llm.checkpoint.files import latest_checkpoint, load_model_weights, read_json
from llm.data import PretrainData, StdlibCorpus, load_pretrained
from llm.model import GPT, GPTConfig
from llm.train.objectives import cross_entropy
from tests.conftest import SMALL, read_metrics, run_cli, run_cli_batch

pytestmark = pytest.mark.integration


def test_run_dir_contract(small_run):
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "metrics.jsonl",
        "results.json",
        "sample.txt",
    ):
        assert (small_run / name).is_file(), name
    assert list((small_run / "tb").glob("events.out.tfevents.*"))
    metrics = read_metrics(small_run)
    assert [m["step"] for m in metrics] == [0, 5, 10, 15, 20]  # step 0: the evaluation before training
    assert {"val_loss", "wall_seconds"} <= set(metrics[0]) and "loss" not in metrics[0]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s", "wall_seconds"} <= set(m) for m in metrics[1:])
    assert "val_loss" in metrics[2] and "val_loss" in metrics[4]
    assert [m["wall_seconds"] for m in metrics] == sorted(m["wall_seconds"] for m in metrics)
    assert 0 < metrics[4]["val_bpb"] < metrics[4]["val_loss"] / math.log(2)  # a token holds more than one byte
    for step in (10, 20):
        ckpt = small_run / "checkpoints" / f"step_{step:07d}"
        for name in (
            "model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
            "model_config.json",
            "manifest.json",
            "tokenizer/tokenizer.json",
        ):
            assert (ckpt / name).is_file(), (step, name)
    assert (small_run / "checkpoints" / "last").read_text().strip() == "step_0000020"
    results = json.loads((small_run / "results.json").read_text())
    for key in (
        "task",
        "steps",
        "tokens",
        "seconds",
        "wall_seconds",
        "train_loss",
        "val_loss",
        "initial_val_loss",
        "params",
        "overrides",
        "git_commit",
        "val_bpb",
        "initial_val_bpb",
    ):
        assert key in results, key
    assert results["wall_seconds"] >= results["seconds"] > 0 and "trainer.save_every=10" in results["overrides"]
    assert results["checkpoint"] == str(small_run / "checkpoints" / "step_0000020")
    assert results["task"] == "pretrain" and results["steps"] == 20 and results["tokens"] == 20 * 8 * 64
    assert results["sample"] and (small_run / "sample.txt").read_text() == results["sample"]
    log = (small_run / "train.log").read_text()
    assert "instantiating model: llm.model.build_gpt" in log and "parameters" in log


def test_validation_loss_improves(small_run):
    results = json.loads((small_run / "results.json").read_text())
    assert results["val_loss"] < results["initial_val_loss"] - 0.5, results


def test_checkpoint_loads_into_fresh_model(small_run, cache_dir):
    """A fresh model from model_config.json + model.safetensors reproduces the run's final validation loss."""
    ckpt = latest_checkpoint(small_run)
    model = GPT(GPTConfig(**read_json(ckpt, "model_config.json")))
    load_model_weights(ckpt, model)
    model.eval()
    tokenizer = load_pretrained(str(ckpt / "tokenizer"))
    data = PretrainData(tokenizer, StdlibCorpus(max_bytes=2_000_000), seq_len=64, cache_dir=str(cache_dir)).prepare()
    assert data.from_cache
    with torch.no_grad():
        losses = [
            cross_entropy(model(b["input_ids"]), b["labels"]).item()
            for b in (data.val.collate([data.val[i] for i in range(s, s + 8)]) for s in range(0, 32, 8))
        ]
    results = json.loads((small_run / "results.json").read_text())
    assert sum(losses) / len(losses) == pytest.approx(results["val_loss"], abs=1e-5)


@pytest.fixture(scope="module")
def continued_run(small_run, cache_dir, tmp_path_factory) -> Path:
    """2 steps from the small run (init_from) logging to tensorboard and wandb at once: one run for the two tests
    below (each had its own 2-step run)."""
    run_dir = tmp_path_factory.mktemp("continued") / "run"
    run_cli(
        [
            *SMALL,
            "trainer.max_steps=2",
            f"init_from={small_run}",
            "tokenizer.vocab_size=999",  # ignored: taken from the run
            "logger=[tensorboard,wandb]",
            f"hydra.run.dir={run_dir}",
        ],
        cache_dir,
    )
    return run_dir


@pytest.mark.xdist_group("continued_run")
def test_init_from_starts_where_the_run_ended(small_run, continued_run):
    before = json.loads((small_run / "results.json").read_text())
    after = json.loads((continued_run / "results.json").read_text())
    assert after["initial_val_loss"] == pytest.approx(before["val_loss"], abs=1e-5)


@pytest.mark.xdist_group("bad_input")
def test_init_from_incompatible_model_is_one_line_error(bad_input_runs):
    result, _ = bad_input_runs["other"]["init_from_incompatible"]
    assert result["returncode"] != 0
    assert "d_model: checkpoint 64 vs model 96" in result["stderr"].strip().splitlines()[-1]


def test_exact_resume_from_checkpoint(small_run, cache_dir, tmp_path):
    """Cut the run back to its step-10 checkpoint, resume: steps 15 and 20 log exactly the same numbers."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(small_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000020")
    (run_dir / "results.json").unlink()
    metrics = read_metrics(run_dir)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics if m["step"] <= 10))
    run_cli([*SMALL, "trainer.save_every=10", "resume=auto", f"hydra.run.dir={run_dir}"], cache_dir)
    original, resumed = read_metrics(small_run), read_metrics(run_dir)
    assert [m["step"] for m in resumed] == [0, 5, 10, 15, 20]
    for a, b in zip(original[3:], resumed[3:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"]
    assert a["val_loss"] == b["val_loss"]


def test_compiled_model_trains_like_eager(small_run, cache_dir, tmp_path):
    """trainer.compile=true (torch.compile of the model, the fused loss included): the same run within rounding."""
    run_dir = tmp_path / "compiled"
    run_cli([*SMALL, "trainer.save_every=10", "trainer.compile=true", f"hydra.run.dir={run_dir}"], cache_dir)
    eager, compiled = read_metrics(small_run), read_metrics(run_dir)
    assert [m["step"] for m in compiled] == [m["step"] for m in eager]
    for a, b in zip(eager[1:], compiled[1:]):  # [0] is the evaluation before training
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), (a, b)
    assert json.loads((run_dir / "results.json").read_text())["val_loss"] == pytest.approx(
        json.loads((small_run / "results.json").read_text())["val_loss"], rel=2e-3
    )


@pytest.mark.xdist_group("continued_run")
def test_several_loggers_at_once(continued_run):
    assert list((continued_run / "tb").glob("events.out.tfevents.*"))
    assert list((continued_run / "wandb").glob("offline-run-*"))
    assert (continued_run / "wandb_run_id.txt").read_text().strip()


@pytest.mark.xdist_group("bad_input")
def test_help_is_the_projects(bad_input_runs):
    result, _ = bad_input_runs["other"]["help"]
    assert result["returncode"] == 0, result["stderr"]
    for line in (
        "Usage: python run.py",
        "hparams_search: dpo, mup, pretrain",
        "task: dpo, eval_length, evaluate, export, grpo, lm_eval, pretrain, sft",
        "optim: adamw, muon",
        "peft: lora",
        "python run.py -m hparams_search=pretrain",
        "Main keys: seed, init_from",
    ):
        assert line in result["stdout"], line
    assert "Powered by Hydra" not in result["stdout"]


@pytest.mark.xdist_group("bad_input")
def test_print_composed_config(bad_input_runs):
    result, _ = bad_input_runs["other"]["cfg"]
    assert result["returncode"] == 0, result["stderr"]
    assert "d_model: 1600" in result["stdout"] and "max_seq_len: 2048" in result["stdout"]


BAD_ROWS = '{"text": "fine"}\n{"text": oops}\n'
ITEMS = '{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": "b", "choices": [" c", " d"], "gold": 1}\n'
BAD_ITEMS = '{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": "b", "gold": 1}\n'
EVAL_TASK = "+evals.tasks.t={source:jsonl,path:{tmp}/t.jsonl,type:mc,metrics:[acc]"  # + "}", or more keys first
NO_FIELD = '{"text": "fine"}\n{"body": "x"}\n'

# (overrides, files to create in tmp_path {name: content} referenced as {tmp}, message in the one-line error)
ERRORS = [
    (["trainer.seq_len=512"], {}, "trainer.seq_len=512 is longer than the model's context model.max_seq_len=128"),
    (["data=files", "data.paths={tmp}/missing.txt"], {}, "file not found: {tmp}/missing.txt"),
    (["data=files", "data.paths={tmp}/empty.txt"], {"empty.txt": ""}, "file is empty: {tmp}/empty.txt"),
    (["data=files", "data.paths={tmp}/bad.jsonl"], {"bad.jsonl": BAD_ROWS}, "{tmp}/bad.jsonl:2: not valid JSON"),
    (
        ["data=files", "data.paths={tmp}/nofield.jsonl"],
        {"nofield.jsonl": NO_FIELD},
        "{tmp}/nofield.jsonl:2: missing field 'text'",
    ),
    (["data=files", "data.paths={tmp}/blank.txt"], {"blank.txt": "\n \n\n"}, "is too small or empty to train a BPE"),
    (["tokenizer=pretrained", "tokenizer.name_or_path=/nonexistent/tok"], {}, "no such directory"),
    (["tokenizer.vocab_size=100"], {}, "tokenizer.vocab_size=100 must be an integer >= 264"),
    (["trainer.device=tpu"], {}, "trainer.device='tpu' is not allowed"),
    (["trainer.precision=fp8"], {}, "trainer.precision='fp8' is not allowed"),
    (["model.pos_emb=alibi"], {}, "model.pos_emb='alibi' is not allowed"),
    (["model.n_head=5"], {}, "model.d_model=64 must be divisible by model.n_head=5"),
    (["+model.n_layers=3"], {}, "unknown model key(s) ['n_layers']"),
    (["trainer.batch_size=0"], {}, "trainer.batch_size=0 must be an integer >= 1"),
    (["trainer.seq_len=0"], {}, "trainer.seq_len=0 must be an integer >= 1"),  # not task.data.seq_len, its copy
    (["trainer.batch_size=abc"], {}, "trainer.batch_size='abc' must be an integer >= 1"),
    (["trainer.max_steps=-5"], {}, "trainer.max_steps=-5 must be an integer >= 0"),
    (["trainer.max_steps=2.5", "optim.lr=inf"], {}, "trainer.max_steps=2.5 must be an integer >= 0"),
    (["seed=abc"], {}, "seed='abc' must be an integer in [0, 4294967295]"),
    (["trainer.micro_batch_size=3"], {}, "must be a multiple of trainer.micro_batch_size=3"),
    (["optim.lr=-0.001"], {}, "optim.lr=-0.001 must be a finite number > 0"),
    (["optim.schedule=exponential"], {}, "optim.schedule='exponential' is not allowed"),
    (["task.data.val_fraction=1.5"], {}, "task.data.val_fraction=1.5 must be a finite number in [0, 1)"),
    (["extrapolation=yarn", "extrapolation.factor=0.5"], {}, "extrapolation.factor=0.5 must be a finite number >= 1"),
    (["resume=/nonexistent/run"], {}, "resume='/nonexistent/run': no such run or checkpoint directory"),
    (["init_from=/nonexistent/run"], {}, "init_from='/nonexistent/run': no such run or checkpoint directory"),
    (["init_from=latest:nosuchtask"], {}, "latest:nosuchtask: no finished nosuchtask run"),
    (["task=dpo"], {}, "task=dpo starts from a trained model: set init_from"),
    (["peft=lora", "peft.rank=0"], {}, "peft.rank=0 must be an integer >= 1"),
    (["peft=lora", "peft.alpha=nan"], {}, "peft.alpha=nan must be a finite number > 0"),
    (["peft=lora", "peft.target_modules=[qkv,attn]"], {}, "peft.target_modules: unknown module name(s) ['attn']"),
    (["hydra.run.dir=/proc/llm_run"], {}, "hydra.run.dir=/proc/llm_run: cannot write to /proc/llm_run"),
    (["hydra.run.dir={tmp}/" + "a" * 300], {}, "hydra.run.dir: the name 'aaaaaaaaaaaaaaaaaaaaaaaa...' has 300 bytes"),
    (["trainer.micro_batch_size=0"], {}, "trainer.micro_batch_size=0 must be an integer >= 1 (or null)"),
    ([EVAL_TASK + "}"], {}, "evals.tasks.t.path: file not found: {tmp}/t.jsonl"),
    ([EVAL_TASK + "}"], {"t.jsonl": BAD_ITEMS}, "{tmp}/t.jsonl:2: missing field 'choices' (a mc item has context"),
    ([EVAL_TASK[:-1] + ",f1]}"], {"t.jsonl": ITEMS}, "evals.tasks.t.metrics: 'f1' is not a metric of a mc task"),
    ([EVAL_TASK + ",num_fewshot:2}"], {"t.jsonl": ITEMS}, "evals.tasks.t.num_fewshot=2: more shots than the task's"),
    (["task=evaluate"], {}, "task=evaluate has no tasks to score: choose evals=core, evals=code or your own"),
    (["model.pos_emb=learned", "model.max_seq_len=4000000000"], {}, "model.max_seq_len=4000000000 with learned"),
    (["task=sft", "post_data=files", "post_data.train.paths=[]"], {}, "post_data.train.paths is empty"),
    (
        ["task=sft", "post_data=files", "post_data.train.paths={tmp}/rows.parquet"],
        {"rows.parquet": "PAR1 not parquet\n"},
        "{tmp}/rows.parquet: cannot be read (Could not open Parquet input source",
    ),
]


assert len(ERRORS) >= 20  # the table keeps covering every validator it was written for


def _ids(errors):
    return [f"{i}-{e[0][-1].split('/')[0][:40]}" for i, e in enumerate(errors)]


def _damage(run_dir: Path, how: str) -> None:
    if how.startswith("metrics"):
        line = b"[1, 2]\n" if how == "metrics-list" else b'{"step": 7, "x": "\xff"}\n'
        (run_dir / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes() + line)
    for step_dir in (run_dir / "checkpoints").glob("step_*"):
        if how == "checkpoints-corrupt":  # each fails its checksum
            (step_dir / "model.safetensors").write_bytes(b"\0" * (step_dir / "model.safetensors").stat().st_size)
        elif how == "not-safetensors":  # a consistent manifest, a file that is not safetensors
            (step_dir / "model.safetensors").write_bytes(b"\xff" * 100)
            manifest = json.loads((step_dir / "manifest.json").read_text())
            manifest["model.safetensors"] = {"size": 100, "sha256": hashlib.sha256(b"\xff" * 100).hexdigest()}
            (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _files(run_dir: Path) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in ("train.log", ".lock")}


DAMAGED = [  # (damage, run.py arguments besides SMALL, the one line's start after "error: ")
    ("metrics-list", ["resume=auto"], "{run}/metrics.jsonl:6: not a JSON object with an integer step"),
    ("metrics-bytes", ["resume=auto"], "{run}/metrics.jsonl:6: not UTF-8 text (byte 0xff"),
    ("checkpoints-corrupt", ["resume=auto"], "resume=auto: no usable checkpoint in {run}/checkpoints"),
    ("not-safetensors", ["task=sft", "init_from={run}"], "{run}/checkpoints/step_0000020/model.safetensors: not a"),
]


def _other_runs(small_run, tmp_path_factory) -> dict:
    """The other runs that stop before any work (errors about init_from, resume, SFT rows and Hydra's own config
    errors; --help and --cfg job): {name: (run.py arguments, what its test needs besides the result)}."""
    tmp = tmp_path_factory.mktemp("other_runs")
    rows = tmp / "chats.jsonl"
    rows.write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "hi", "response": ""}\n')
    resumed = tmp / "resumed"  # a bad resume (incompatible model) of a copy of the small run
    shutil.copytree(small_run, resumed)
    watched = [
        p
        for p in resumed.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name not in ("train.log", ".lock")
    ]
    other = {
        "help": (["--help"], None),
        "cfg": (["model=1b", "--cfg", "job"], None),
        "init_from_incompatible": (
            [*SMALL, "model.d_model=96", f"init_from={small_run}", f"hydra.run.dir={tmp / 'x'}"],
            None,
        ),
        "failed_resume": (
            [*SMALL, "model.d_model=96", "resume=auto", f"hydra.run.dir={resumed}"],
            (watched, {p: p.read_bytes() for p in watched}),
        ),
        "sft_bad_rows": (
            [
                *SMALL,
                "task=sft",
                f"init_from={small_run}",
                "post_data=files",
                f"post_data.train.paths={rows}",
                f"hydra.run.dir={tmp / 'r'}",
            ],
            rows,
        ),
    }
    for i, (overrides, _) in enumerate(CONFIG_ERRORS):
        other[f"config{i}"] = ([*overrides, f"hydra.run.dir={tmp / f'never{i}'}"], tmp / f"never{i}")
    return other


@pytest.fixture(scope="module")
def bad_input_runs(cache_dir, tmp_path_factory, small_run) -> dict:
    """Every row of ERRORS, every DAMAGED copy of the small run, then the other runs that stop before any work
    (_other_runs), through run.py in one interpreter (run_cli_batch): {"table": [(result, tmp dir)], "damaged":
    [(result, run dir, its files before)], "other": {name: (result, what its test needs or None)}, "config":
    [(result, run dir)] for CONFIG_ERRORS}."""
    arg_lists, dirs, damaged = [], [], []
    for overrides, files, _ in ERRORS:
        tmp = tmp_path_factory.mktemp("bad_input")
        for name, content in files.items():
            (tmp / name).write_text(content)
        overrides = [o.replace("{tmp}", str(tmp)) for o in overrides]
        groups = {o.split("=")[0] for o in overrides if "." not in o.split("=")[0]}  # e.g. data=files
        base = [o for o in SMALL if o.split(".")[0] not in groups]  # drop the shrink keys of a replaced group
        run_dir = [] if any(o.startswith("hydra.run.dir") for o in overrides) else [f"hydra.run.dir={tmp / 'run'}"]
        arg_lists.append([*base, *overrides, *run_dir])
        dirs.append(tmp)
    for how, args, _ in DAMAGED:
        tmp = tmp_path_factory.mktemp("damaged")
        shutil.copytree(small_run, tmp / "run")
        _damage(tmp / "run", how)
        out = tmp / ("new" if how == "not-safetensors" else "run")  # init_from writes a new run
        arg_lists.append([*SMALL, *[a.replace("{run}", str(tmp / "run")) for a in args], f"hydra.run.dir={out}"])
        damaged.append((tmp / "run", _files(tmp / "run")))
    other = _other_runs(small_run, tmp_path_factory)
    results = run_cli_batch([*arg_lists, *(args for args, _ in other.values())], cache_dir)
    by_name = dict(zip(other, results[len(arg_lists) :]))
    return {
        "table": list(zip(results, dirs)),
        "damaged": [(r, run, before) for r, (run, before) in zip(results[len(ERRORS) :], damaged)],
        "other": {name: (by_name[name], extra) for name, (_, extra) in other.items()},
        "config": [(by_name[f"config{i}"], other[f"config{i}"][1]) for i in range(len(CONFIG_ERRORS))],
    }


@pytest.mark.xdist_group("bad_input")  # one worker runs the batch
@pytest.mark.parametrize("case", range(len(ERRORS)), ids=_ids(ERRORS))
def test_bad_input_is_a_one_line_error(case, bad_input_runs):
    """The bad-input table: one line naming the culprit, exit code 2, no traceback."""
    result, tmp = bad_input_runs["table"][case]
    message = ERRORS[case][2].replace("{tmp}", str(tmp))
    assert result["returncode"] == 2, result["stderr"][-2000:]
    last = result["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result["stderr"][-2000:]
    assert "Traceback" not in result["stderr"]


@pytest.mark.xdist_group("bad_input")
def test_failed_resume_leaves_the_run_untouched(bad_input_runs):
    """A bad resume (incompatible model) deletes or rewrites nothing of the run it points at."""
    result, (watched, before) = bad_input_runs["other"]["failed_resume"]
    assert result["returncode"] == 2 and "d_model: checkpoint 64 vs model 96" in result["stderr"]
    assert {p: p.read_bytes() for p in watched} == before


@pytest.mark.xdist_group("bad_input")
@pytest.mark.parametrize("case", range(len(DAMAGED)), ids=[d[0] for d in DAMAGED])
def test_damaged_runs_are_refused_in_one_line_untouched(case, bad_input_runs):
    """A resume or init_from on a run whose files are damaged (a metrics line that is not a record, every
    checkpoint corrupt, a weights file that is not safetensors): one line naming it, exit 2, no traceback, and not
    a byte of the run changed (a resume never starts over on its own)."""
    result, run, before = bad_input_runs["damaged"][case]
    last = result["stderr"].strip().splitlines()[-1]
    assert result["returncode"] == 2 and last.startswith("error: " + DAMAGED[case][2].replace("{run}", str(run))), last
    assert "Traceback" not in result["stderr"]
    assert _files(run) == before


CONFIG_ERRORS = [  # (overrides, Hydra's message)
    (["trainer.no_such_key=1"], "Could not override 'trainer.no_such_key'"),
    (["model=no_such_model"], "Could not find 'model/no_such_model'"),
]


@pytest.mark.xdist_group("bad_input")
@pytest.mark.parametrize("case", range(len(CONFIG_ERRORS)), ids=[e[0][0] for e in CONFIG_ERRORS])
def test_config_errors_write_nothing(case, bad_input_runs):
    result, run_dir = bad_input_runs["config"][case]
    assert result["returncode"] != 0 and CONFIG_ERRORS[case][1] in result["stderr"]
    assert not run_dir.exists()


def test_pretrain_sft_dpo_chain(small_run, cache_dir, tmp_path):
    """SFT from the pretraining run, then DPO from the SFT run, through run.py; the results carry the
    post-training metrics, and SFT's the downstream evaluation of a local task before -> after."""
    from tests.unit.test_downstream import mc_rows, write_jsonl

    toy = write_jsonl(tmp_path / "toy.jsonl", mc_rows())
    post = [
        "task.data.eval_samples=16",
        "post_data.train.num_examples=200",
        "post_data.val.num_examples=16",
        "trainer.seq_len=64",
        "trainer.eval_every=5",
        "trainer.log_every=5",
    ]
    base = [o for o in SMALL if not o.startswith(("trainer.seq_len", "trainer.eval_every", "trainer.log_every"))]
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    results = run_cli_batch(  # one interpreter for both runs: DPO starts once SFT has finished
        [
            [
                *base,
                *post,
                "task=sft",
                "trainer.max_steps=10",
                f"init_from={small_run}",
                "task.data.packing=true",
                f"+evals.tasks.toy={{source:jsonl,path:{toy},type:mc,metrics:[acc,acc_norm],primary:acc_norm}}",
                f"hydra.run.dir={sft_dir}",
            ],
            [*base, *post, "task=dpo", "trainer.max_steps=10", f"init_from={sft_dir}", f"hydra.run.dir={dpo_dir}"],
        ],
        cache_dir,
    )
    assert [r["returncode"] for r in results] == [0, 0], [r["stderr"][-3000:] for r in results]
    sft = json.loads((sft_dir / "results.json").read_text())
    assert sft["task"] == "sft" and 0 <= sft["exact_match"] <= 1 and "exact_match_before" in sft
    assert sft["val_loss"] < sft["initial_val_loss"]
    assert "packed" in (sft_dir / "train.log").read_text()
    core = f"eval/core {sft['eval/core_before']:.4g} -> {sft['eval/core']:.4g}"  # the closing line: before -> after
    assert "eval/toy/acc_norm_before" in sft and core in (sft_dir / "train.log").read_text()
    dpo = json.loads((dpo_dir / "results.json").read_text())
    assert dpo["task"] == "dpo"
    for key in ("preference_accuracy", "reward_margin", "exact_match", "preference_accuracy_before"):
        assert key in dpo, key
    assert dpo["initial_val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    # the policy moved away from its reference; that DPO moves preferences the right way is
    # test_posttrain.py::test_dpo_training_moves_preferences (an SFT of 10 steps knows too little to show it here)
    assert dpo["reward_margin"] != 0 and dpo["val_loss"] != dpo["initial_val_loss"], dpo
    metrics = read_metrics(dpo_dir)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen"} <= set(
        metrics[1]
    )


@pytest.mark.xdist_group("bad_input")
def test_sft_bad_rows_name_file_and_line(bad_input_runs):
    result, rows = bad_input_runs["other"]["sft_bad_rows"]
    assert result["returncode"] != 0
    assert f"{rows}:2: field 'response' is empty" in result["stderr"].strip().splitlines()[-1]


EVAL = [
    "task=eval_length",
    "task.objective.multiples=[1,2]",
    "task.objective.windows=4",
    "task.objective.passkey_trials=2",
    "task.objective.passkey_depths=[0.5]",
]


def _mixture_args(tmp: Path) -> list[str]:
    """A mixture of two local files, a at 0.8 and b at 0.2, with a capped at its first 64 windows."""
    rng = __import__("numpy").random.default_rng(0)
    for name, words in (("a", "red green blue cyan magenta"), ("b", "one two three four five six")):
        (tmp / f"{name}.txt").write_text("\n".join(" ".join(rng.choice(words.split(), 30)) for _ in range(300)))
    model = [o for o in SMALL if o.startswith("model.")]
    trainer = [
        "trainer.max_steps=20",
        "trainer.batch_size=8",
        "trainer.seq_len=32",
        "trainer.eval_every=10",
        "trainer.eval_batches=2",
        "trainer.log_every=10",
        "trainer.progress=false",
        "tokenizer.vocab_size=300",
        "task.sample.max_new_tokens=4",
        "logger=none",
    ]
    # a: its first 64 windows (max_tokens), b a quarter of that: 80 windows, so 20 steps of 8 are two epochs
    sources = [
        "data=mix",
        "~data.sources.code",
        "~data.sources.text",
        f"+data.sources.a={{corpus:{{_target_:llm.data.FileCorpus,paths:[{tmp}/a.txt]}},weight:0.8,"
        f"max_tokens:{64 * 32}}}",
        f"+data.sources.b={{corpus:{{_target_:llm.data.FileCorpus,paths:[{tmp}/b.txt]}},weight:0.2}}",
    ]
    return [*model, *trainer, *sources, f"hydra.run.dir={tmp / 'run'}"]


@pytest.fixture(scope="module")
def eval_and_mixture_runs(small_run, cache_dir, tmp_path_factory) -> dict[str, Path]:
    """The length evaluation of the small run (yarn x2), its -m sweep (none, ntk) and the mixture run, one after
    the other in one interpreter (run_cli_batch; each had its own): {name: its dir}."""
    tmp = tmp_path_factory.mktemp("eval_and_mixture")
    base = [o for o in SMALL if not o.startswith(("model.", "task.sample"))]  # the architecture: the checkpoint's
    (tmp / "mixture").mkdir()
    runs = {
        "eval": [*base, *EVAL, "extrapolation=yarn", "extrapolation.factor=2", f"init_from={small_run}"],
        "sweep": ["-m", *base, *EVAL, "extrapolation=none,ntk", f"init_from={small_run}"],
        "mixture": _mixture_args(tmp / "mixture"),
    }
    runs["eval"].append(f"hydra.run.dir={tmp / 'eval'}")
    runs["sweep"].append(f"hydra.sweep.dir={tmp / 'sweep'}")
    results = run_cli_batch(list(runs.values()), cache_dir)
    for name, result in zip(runs, results):
        assert result["returncode"] == 0, (name, result["stderr"][-3000:])
    return {"eval": tmp / "eval", "sweep": tmp / "sweep", "mixture": tmp / "mixture" / "run"}


@pytest.mark.xdist_group("eval_and_mixture")
def test_eval_length_writes_table_and_plot(eval_and_mixture_runs):
    run_dir = eval_and_mixture_runs["eval"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 0 and results["method"] == "yarn x2" and results["context"] == 128
    assert set(results["ppl_by_length"]) == set(results["passkey_by_length"]) == {"128", "256"}
    assert set(results["bpb_by_length"]) == {"128", "256"} and all(v > 0 for v in results["bpb_by_length"].values())
    assert results["val_bpb"] > 0
    assert all(v > 1 for v in results["ppl_by_length"].values())
    assert (run_dir / "length_eval.png").stat().st_size > 1000
    assert "| yarn x2 |" in (run_dir / "length_eval.md").read_text()
    assert not (run_dir / "checkpoints").exists()  # nothing trained, nothing saved
    log = (run_dir / "train.log").read_text()
    assert "evaluation only (no training step)" in log and "0 steps x" not in log
    assert results["seconds"] > 0 and "done: evaluation in " in log  # its real duration, not '0 steps in 0.0s'


@pytest.mark.xdist_group("eval_and_mixture")
def test_eval_length_sweep_combines_methods(eval_and_mixture_runs):
    sweep = eval_and_mixture_runs["sweep"]
    table = (sweep / "length_eval.md").read_text()
    assert "| none |" in table and "| ntk x4 |" in table
    assert (sweep / "length_eval.png").stat().st_size > 1000
    assert len(json.loads((sweep / "length_eval.json").read_text())) == 2
    assert (sweep / "sweep_summary.md").read_text().count("| done |") == 2


@pytest.mark.xdist_group("eval_and_mixture")
def test_a_mixture_realises_its_weights(eval_and_mixture_runs):
    run_dir = eval_and_mixture_runs["mixture"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["mix/a"] == pytest.approx(0.8, abs=0.02) and results["mix/b"] == pytest.approx(0.2, abs=0.02)
    assert "mix/a 0.8" in (run_dir / "train.log").read_text()
    assert "data: mixture of 80 train windows: a 80.0% (64 of" in (run_dir / "train.log").read_text()
