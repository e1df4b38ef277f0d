"""`python -m llm.generate`: the same greedy text from a run dir, a checkpoint dir and an HF model dir, prompts from a
pipe (a stdin that is not a terminal), chat replies that keep the conversation, one-line errors; the interactive
chat on a pseudo-terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from llm.checkpoint.files import save_checkpoint, step_dir_name
from llm.data.chat import encode_chat
from llm.generate import Generator, main
from llm.hf import save_hf
from llm.model import GPT, GPTConfig
from tests.conftest import ROOT

pytestmark = pytest.mark.xdist_group("generate")  # one worker saves the module's model dirs


@pytest.fixture(scope="module")
def dirs(tiny_tokenizer, tmp_path_factory):
    """The same tiny model as a run dir, a checkpoint dir and an HF model dir."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=len(tiny_tokenizer), n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32)
    ).eval()
    tmp = tmp_path_factory.mktemp("generate")
    ckpt = save_checkpoint(
        tmp / "run" / "checkpoints" / step_dir_name(1), model, None, {"step": 1}, model.config.to_dict(), tiny_tokenizer
    )
    save_hf(model, tiny_tokenizer, tmp / "hf")
    return model, {"run": tmp / "run", "checkpoint": ckpt, "hf": tmp / "hf"}


def generate(*argv, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    code = main([str(a) for a in argv], stdin=io.StringIO(stdin), stdout=out)
    return code, out.getvalue()


GREEDY = ("--temperature", "0", "--max-new-tokens", "12")


def test_same_text_from_every_kind_of_dir(dirs, tiny_tokenizer):
    model, paths = dirs
    ids = tiny_tokenizer("reverse: open file", add_special_tokens=False)["input_ids"]
    expected = tiny_tokenizer.decode(
        model.generate(torch.tensor([ids]), 12, temperature=0, eos_token_id=tiny_tokenizer.eos_token_id)[
            0, len(ids) :
        ].tolist(),
        skip_special_tokens=True,
    )
    for kind, path in paths.items():
        assert generate(path, *GREEDY, stdin="reverse: open file\n") == (0, expected + "\n"), kind  # a pipe
        assert generate(path, *GREEDY, "--prompt", "reverse: open file") == (0, expected + "\n"), kind
    chat = {kind: generate(path, *GREEDY, "--chat", "--prompt", "sort: b a") for kind, path in paths.items()}
    assert len(set(chat.values())) == 1 and chat["hf"][0] == 0
    sampled = [
        generate(paths["hf"], "--max-new-tokens", "12", "--seed", "3", "--top-p", "0.9", "--prompt", "a")
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # seeded


def test_chat_keeps_the_conversation(dirs, tiny_tokenizer):
    model, _ = dirs
    gen = Generator(model, tiny_tokenizer, max_new_tokens=6, temperature=0, system="be brief")
    first = gen.reply("sort: b a", io.StringIO())
    gen.reply("reverse: x y", io.StringIO())
    assert [m["role"] for m in gen.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert gen.messages[2]["content"] == first.strip()
    earlier = encode_chat(tiny_tokenizer, gen.messages[:3])[0]
    assert encode_chat(tiny_tokenizer, gen.messages)[0][: len(earlier)] == earlier
    gen.reset()
    assert gen.messages == [{"role": "system", "content": "be brief"}]


def test_errors_are_one_line(dirs, tmp_path, capsys):
    assert generate(tmp_path, "--prompt", "x")[0] == 2
    assert generate(dirs[1]["hf"], "--prompt", "x", "--temperature", "-1")[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: model='{tmp_path}': no complete checkpoint") and "--temperature" in err[1]


def test_interactive_chat_in_a_terminal(dirs):
    """The module as users run it, on a pseudo-terminal: no --prompt means a chat; two turns, then /exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    path = str(dirs[1]["hf"])
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm.generate", path, "--max-new-tokens", "4"],
        stdin=follower,
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    os.close(follower)
    seen = b""

    def read_until_prompt(count: int) -> None:
        nonlocal seen
        deadline = time.monotonic() + 120
        while seen.count(b"> ") < count and time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 4096)

    try:
        read_until_prompt(1)
        for turn, message in enumerate((b"sort: b a\n", b"reverse: x y\n"), start=2):
            os.write(leader, message)
            read_until_prompt(turn)
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        proc.kill()
        os.close(leader)
    assert seen.startswith(b"chat:") and seen.count(b"> ") == 3 and b"reverse: x y" in seen
