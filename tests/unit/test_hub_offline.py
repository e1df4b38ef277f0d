"""A hub name with the hub offline (HF_HUB_OFFLINE=1) or unreachable fails in seconds with one line naming the key
and the name, without the libraries' retries; the probe asks once per process."""

from __future__ import annotations

import datasets.config
import huggingface_hub.constants
import pytest

from llm.data import HubCorpus, HubRows, hub, load_pretrained
from llm.errors import ConfigError, DataError
from llm.hf import fetch_hub_model
from tests.conftest import SMALL, run_cli

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once, no DNS, no network needed


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test only (the probe's answer and the libraries' flags restored after)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    hub.offline_reason.cache_clear()
    yield
    hub.offline_reason.cache_clear()


@pytest.mark.parametrize(
    "key,load,error",
    [
        ("data.name", lambda: HubCorpus("nobody/nothing").load(), DataError),
        ("post_data dataset", lambda: list(HubRows("nobody/nothing").rows()), DataError),
        ("tokenizer.name_or_path", lambda: load_pretrained("nobody/nothing"), DataError),
        ("init_from", lambda: fetch_hub_model("nobody/nothing"), ConfigError),
    ],
)
def test_every_hub_name_fails_with_one_line_when_offline(key, load, error, offline):
    with pytest.raises(error) as info:
        load()
    assert str(info.value) == (
        f"{key}=nobody/nothing: not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1)"
    )


def test_an_unreachable_hub_is_found_once_and_the_libraries_go_offline(monkeypatch, offline):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    hub.offline_reason.cache_clear()
    assert hub.offline_reason().startswith(f"the hub ({UNREACHABLE}) cannot be reached: ")
    with pytest.raises(DataError, match="cannot be reached"):
        HubCorpus("nobody/nothing").load()
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE  # no request, no retry


def test_run_py_with_an_unreachable_hub_ends_in_one_line(tmp_path, cache_dir):
    proc = run_cli(
        [*SMALL, "task=sft", "init_from=nobody/nothing", f"hydra.run.dir={tmp_path}"],
        cache_dir,
        check=False,
        env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": UNREACHABLE},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: init_from=nobody/nothing: not in the local Hugging Face "
        f"cache and the hub ({UNREACHABLE}) cannot be reached: "
        f"Connection refused"
    )
    assert "Retry" not in proc.stderr and "thrown while requesting" not in proc.stderr
