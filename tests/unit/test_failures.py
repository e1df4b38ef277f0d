"""Errors that end a run, as one line (llm.failures): the library's and the machine's own exceptions — real ones,
raised by safetensors, pyarrow, the file system — named with their file and what to do; nothing already written
changes. Faults are made as they happen: a small tmpfs that fills up, a file-size limit, a read-only bind mount
(mounting needs root: skipped, with the reason, where the machine does not allow it)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import resource
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from loguru import logger
from omegaconf import OmegaConf
from safetensors import SafetensorError

import llm.checkpoint.files as ckpt
from llm.checkpoint.adapters import check_base, load_adapted
from llm.checkpoint.checkpointer import Checkpointer
from llm.data import FileCorpus, LocalRows, PretrainData, train_bpe
from llm.dist.launch import _worker
from llm.errors import ConfigError, DataError, LLMError, ResourceError, TrainingError
from llm.failures import about, explain, quiet_loggers, report
from llm.model import build_gpt
from llm.rundir.writable import check_writable_dir
from llm.tasks.config import build, check_cache_dir
from llm.train.loggers import JsonlLogger
from llm.train.optim import OptimizerConfig
from llm.train.settings import LoopSettings


def _model_and_optimizer():
    torch.manual_seed(0)
    model = build_gpt(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)
    return model, OptimizerConfig(lr=1e-2).build(model, "cpu")


def _hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    """mount(8) `target` with `options` for the block (skips the test where the machine does not allow it)."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or proc.returncode}): needs root in a mount namespace")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_library_errors_become_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 100)
    with pytest.raises(SafetensorError) as raised:  # the real error safetensors raises
        ckpt.load_file(str(bad))
    assert str(explain(raised.value, bad)).startswith(f"{bad}: not a readable safetensors file (")
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert isinstance(explain(full), ResourceError) and "No space left on device: free some space" in str(explain(full))
    too_long = OSError(errno.ENAMETOOLONG, "File name too long", "/x/" + "a" * 300)
    assert "a name of 300 bytes" in str(explain(too_long)) and str(explain(too_long)).startswith("/x/aaa")
    with pytest.raises(UnicodeDecodeError) as raised:
        b"ok \xfe".decode()
    assert str(explain(raised.value, "f.txt")) == "f.txt: not UTF-8 text (byte 0xfe at offset 3)"
    assert explain(KeyError("a bug")) is None
    line = report(KeyError("x"), "run/train.log")
    assert line.startswith("error: unexpected KeyError: 'x' (the traceback is in run/train.log") and "\n" not in line
    with pytest.raises(
        ConfigError,
        match="^resume: .*the weights do not fit the model its config describes: weight is \\[3, 3\\] in the file",
    ):
        with about("ckpt/model.safetensors", "resume: "):
            torch.nn.Linear(2, 3).load_state_dict({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)})


def test_a_parquet_file_that_is_not_parquet_is_named(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1 not parquet at all\n" * 10)
    with pytest.raises(DataError, match=f"^{path}: cannot be read \\(Could not open Parquet input source"):
        list(LocalRows(str(path)).rows())
    with pytest.raises(ConfigError, match=r"^post_data.train.paths is empty"):  # the key this group uses
        LocalRows([])
    with pytest.raises(ConfigError, match=r"^data.paths is empty"):
        FileCorpus([])


def test_a_full_disk_or_file_size_limit_in_safetensors_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    saver = Checkpointer(tmp_path)
    good = saver.save(2, model, opt, {"step": 2})
    before = _hashes(tmp_path)
    for code, text in ((errno.ENOSPC, "No space left on device"), (errno.EFBIG, "File too large")):

        def from_safetensors(*args, code=code, text=text, **kwargs):  # what safetensors raises, not an OSError
            raise SafetensorError(f"Error while serializing: I/O error: {text} (os error {code})")

        monkeypatch.setattr(ckpt, "save_model", from_safetensors)
        with pytest.raises(
            TrainingError, match=f"could not be written \\({text}: .*newest complete checkpoint is {good}"
        ):
            saver.save(4, model, opt, {"step": 4})
        assert _hashes(tmp_path) == before  # the partial step dir removed, `last` unchanged


def test_a_real_small_filesystem_that_fills_up_while_saving(tmp_path):
    model, opt = _model_and_optimizer()
    probe = Checkpointer(tmp_path / "probe").save(2, model, opt, {"step": 2})
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    with mounted(tmp_path / "fs", "-t", "tmpfs", "-o", f"size={(size + 40_000) // 1024}k", "tmpfs") as fs:
        saver = Checkpointer(fs / "run")
        good = saver.save(2, model, opt, {"step": 2})  # fits; the second does not
        before = _hashes(fs / "run")
        with pytest.raises(TrainingError, match=f"No space left on device.*newest complete checkpoint is {good}"):
            saver.save(4, model, opt, {"step": 4})
        assert _hashes(fs / "run") == before and ckpt.latest_checkpoint(fs / "run") == good


def test_a_file_size_limit_while_saving(tmp_path):
    model, opt = _model_and_optimizer()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(TrainingError, match="could not be written \\(File too large: a file-size limit"):
            Checkpointer(tmp_path).save(2, model, opt, {"step": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not list((tmp_path / "checkpoints").iterdir())


def test_resume_auto_refuses_when_no_checkpoint_is_usable(tmp_path):
    model, opt = _model_and_optimizer()
    saver = Checkpointer(tmp_path)
    assert saver.restore("auto", model, opt) is None  # nothing saved yet: a fresh start
    path = saver.save(2, model, opt, {"step": 2})
    (path / "model.safetensors").write_bytes(b"\0" * (path / "model.safetensors").stat().st_size)
    before = _hashes(tmp_path)
    with pytest.raises(ConfigError, match="resume=auto: no usable checkpoint in .*step_0000002.*overwrite=true"):
        saver.restore("auto", model, opt)
    assert _hashes(tmp_path) == before


def test_checkpoints_that_are_not_ours_are_named(tmp_path):
    model, opt = _model_and_optimizer()
    path = Checkpointer(tmp_path).save(2, model, opt, {"step": 2})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(
        ConfigError, match="no model_config.json.*pytorch_model.bin is a PyTorch pickle, which is never"
    ):
        ckpt.read_json(pickled, "model_config.json")
    other = build_gpt(vocab_size=100, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)  # a wrong config
    with pytest.raises(ConfigError, match=r"model.safetensors: the weights do not fit .*\[64, 16\] in the file, \[128"):
        ckpt.load_model_weights(path, other)
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(DataError, match=f"^{path / 'model.safetensors'}: not a readable safetensors file"):
        ckpt.load_model_weights(path, model)


def test_a_damaged_lora_record_is_named(tmp_path):
    """A LoRA checkpoint's adapter.json that is not JSON, or not the record of the adapters: one line naming it
    (export, generate and a later init_from read it; so does a resume's base check)."""
    (tmp_path / "adapter.json").write_text('{"rank": 4, "base": ')  # torn
    with pytest.raises(DataError, match=f"^{tmp_path / 'adapter.json'}: not valid JSON"):
        load_adapted(tmp_path, load_base=None)
    (tmp_path / "adapter.json").write_text('{"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all"}')
    with pytest.raises(DataError, match=f"^{tmp_path / 'adapter.json'}: not the record of a LoRA run's .*no base"):
        check_base(tmp_path, None, "resume")


@pytest.mark.parametrize("line", [b"[1, 2]\n", b'{"step": 5, "x": "\xff"}\n', b"{oops\n", b'{"step": "5"}\n'])
def test_metrics_lines_that_are_not_records_stop_a_resume_untouched(tmp_path, line):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 5, "loss": 1.0}\n' + line + b'{"step": 10, "loss": 0.9}\n')
    before = path.read_bytes()
    with pytest.raises(DataError, match=f"^{path}:2: not .*fix or delete that line"):
        JsonlLogger(str(tmp_path), start_step=10)
    assert path.read_bytes() == before
    JsonlLogger(str(tmp_path), start_step=0).open()  # started over (overwrite=true): nothing of it is read
    assert path.read_bytes() == b""


def test_a_complete_cache_on_a_read_only_mount_is_used_as_it_is(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "docs.txt").write_text("\n".join(" ".join(rng.choice(list("abcdefgh"), 12)) for _ in range(300)))
    corpus, cache = FileCorpus(str(tmp_path / "docs.txt")), tmp_path / "cache"
    tokenizer = train_bpe(corpus, vocab_size=300, cache_dir=str(cache))
    PretrainData(tokenizer, corpus, seq_len=16, cache_dir=str(cache)).prepare()
    for lock in cache.rglob("*.lock"):
        lock.unlink()  # a cache copied to a shared read-only volume
    before = _hashes(cache)
    with mounted(tmp_path / "ro", "--bind", str(cache)) as ro, mounted(ro, "-o", "remount,ro,bind"):
        assert check_cache_dir("cache_dir", str(ro)) is False  # no error: read as it is
        again = train_bpe(corpus, vocab_size=300, cache_dir=str(ro))
        data = PretrainData(again, corpus, seq_len=16, cache_dir=str(ro)).prepare()
        assert data.from_cache and len(data.train) > 0
        with pytest.raises(ConfigError, match="is not in the cache, and the cache dir cannot be written"):
            train_bpe(corpus, vocab_size=280, cache_dir=str(ro))
    assert _hashes(cache) == before


def test_names_too_long_and_a_model_too_big_are_named(tmp_path):
    with pytest.raises(ConfigError, match="hydra.run.dir: the name 'aaaa.*' has 300 bytes; this file system allows"):
        check_writable_dir("hydra.run.dir", tmp_path / ("a" * 300), create=False)
    node = OmegaConf.create(
        {
            "_target_": "llm.model.build_gpt",
            "n_layer": 1,
            "n_head": 2,
            "n_kv_head": 2,
            "d_model": 64,
            "pos_emb": "learned",
            "max_seq_len": 4_000_000_000,
        }
    )  # 1 TB of positions
    with pytest.raises(ResourceError, match="model.max_seq_len=4000000000 with learned positions makes a"):
        build(node, "model", vocab_size=300)
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_size=0 must be an integer >= 1 \(or null\)"):
        LoopSettings(batch_size=8, seq_len=16, max_steps=1, micro_batch_size=0)


def test_a_workers_error_is_one_line_for_the_parent(tmp_path):
    def fails(cfg, run_dir):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    try:
        with pytest.raises(LLMError, match="No space left on device") as raised:  # the parent knows it by class name
            _worker(fails, {}, str(tmp_path), None, {})
    finally:
        logger.remove()  # the worker's sinks (its console, train.log)
    assert type(raised.value).__name__ == "ResourceError"
    assert "SafetensorError" in (tmp_path / "train.log").read_text()  # its traceback, in the rank's log
    elastic = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    was = elastic.disabled  # another test in this process may have left it disabled (Hydra's logging config does)
    elastic.disabled = False
    try:
        with quiet_loggers(("torch.distributed.elastic",)):
            assert elastic.disabled
        assert not elastic.disabled  # restored as it was before the block
    finally:
        elastic.disabled = was
