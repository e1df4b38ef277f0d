"""`python -m llm.serve` (llm/serve/): a real server on a free port of 127.0.0.1 (uvicorn in a thread) on a tiny
random model, talked to with the official `openai` client — chat and completions, streamed and not, equal to
`python -m llm.generate`'s greedy reply; 8 concurrent clients decoding in one batch get the replies they get alone;
errors as the client's own exception classes; a stream cut mid-way frees its row; an error after streaming began
arrives as a final chunk. The bad-request table in-process (Starlette's TestClient). The chat page in a real
headless Chromium (Debian's `chromium`, driven by Playwright; it fails in CI when the browser cannot start)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from starlette.testclient import TestClient

from llm.checkpoint.files import save_checkpoint
from llm.generate import Generator
from llm.model import GPT, GPTConfig
from llm.serve.app import ServerState, create_app
from llm.serve.cli import context_of, main, parse_args, prepare, serve_in_thread
from llm.serve.engine import Engine
from llm.serve.protocol import Limits

pytestmark = pytest.mark.xdist_group("serve")  # one model and server for the module
NAME, KEY = "tiny", "sesame"
GREEDY = {"temperature": 0, "max_tokens": 16}


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    """A 2-layer random model (weights drawn wide, so its greedy text varies, multi-byte pieces included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread beats two waiting for each other on a busy machine
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(tiny_tokenizer), n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=256)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    yield model, tiny_tokenizer
    torch.set_num_threads(threads)


def _state(tiny, key=None, max_queue=16, limits=None) -> ServerState:
    model, tokenizer = tiny
    state = ServerState(NAME, limits or Limits(max_tokens=200, max_chars=2000, max_body_bytes=10_000), key)
    state.ready(Engine(model, tokenizer, max_batch=8, max_queue=max_queue), tokenizer, context_of(model))
    return state


@pytest.fixture(scope="module")
def served(tiny):
    state = _state(tiny)
    server, url = serve_in_thread(create_app(state))
    yield state, url
    server.should_exit = True
    state.engine.close()


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def _alone(tiny, prompt: str, chat: bool, max_tokens: int = 16) -> str:
    """`python -m llm.generate`'s greedy reply (its Generator, in-process)."""
    gen = Generator(*tiny, max_new_tokens=max_tokens, temperature=0)
    return gen.reply(prompt, io.StringIO()) if chat else gen.complete(prompt, io.StringIO())


def _ask(client, prompt: str, chat: bool, stream: bool, **settings):
    """(text, finish_reason, chunks) through the official client."""
    if chat:
        out = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": prompt}], stream=stream, **settings
        )
        if not stream:
            return out.choices[0].message.content, out.choices[0].finish_reason, [out]
        chunks = list(out)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return (
            text,
            next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason),
            chunks,
        )
    out = client.completions.create(model=NAME, prompt=prompt, stream=stream, **settings)
    chunks = list(out) if stream else [out]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), chunks


def test_openai_client_streamed_and_not_equal_generate(served, tiny):
    _, url = served
    client = _client(url)
    assert [m.id for m in client.models.list().data] == [NAME]
    for chat, prompt in ((True, "sort: pear fig"), (False, "reverse: one two")):
        expected = _alone(tiny, prompt, chat)
        whole, finish, (obj,) = _ask(client, prompt, chat, stream=False, **GREEDY)
        streamed, stream_finish, chunks = _ask(
            client, prompt, chat, True, stream_options={"include_usage": True}, **GREEDY
        )
        assert whole == streamed == expected and expected, chat
        assert finish == stream_finish == "length" and obj.usage.completion_tokens == 16
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16  # usage: its own last chunk
        assert len({c.id for c in chunks}) == 1 and all(c.model == NAME and c.created for c in chunks)
        if chat:
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    with httpx.stream("POST", url + "/v1/completions", json={"model": NAME, "prompt": "a", "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_and_seeds(served, tiny):
    _, url = served
    client = _client(url)
    text = _alone(tiny, "add 3 4", chat=False, max_tokens=16)
    stop = text[5:8]
    cut, finish, _ = _ask(client, "add 3 4", False, False, stop=[stop, "never"], **GREEDY)
    assert (cut, finish) == (text[: text.index(stop)], "stop")
    streamed, _, _ = _ask(client, "add 3 4", False, True, stop=stop, **GREEDY)
    assert streamed == cut
    sampled = {_ask(client, "x", True, False, temperature=1, top_p=0.9, seed=7, max_tokens=12)[0] for _ in range(2)}
    assert len(sampled) == 1


def test_eight_concurrent_clients_get_their_alone_replies(served, tiny, monkeypatch):
    state, url = served
    prompts = [f"sort: {' '.join('pear fig kiwi plum'.split()[: 1 + i % 4])} {i}" for i in range(8)]
    expected = [_alone(tiny, p, chat=i % 2 == 0, max_tokens=24) for i, p in enumerate(prompts)]
    replies, start = [None] * 8, threading.Barrier(8)

    def ask(i):
        start.wait()
        replies[i] = _ask(_client(url), prompts[i], i % 2 == 0, i % 3 == 0, temperature=0, max_tokens=24)[0]

    state.engine.peak = 0
    _slow(monkeypatch, state.engine, 0.01)  # 24 steps of 10 ms or more: the requests overlap on any machine
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert replies == expected
    assert state.engine.peak > 1  # they decoded together


def test_errors_arrive_as_the_clients_exceptions(served, tiny):
    _, url = served
    client = _client(url)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _ask(client, "x", True, False, temperature=-1)
    with pytest.raises(openai.BadRequestError, match=r"\d+ tokens.*256"):
        _ask(client, "x " * 300, False, False)
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    keyed, full = _state(tiny, key=KEY), _state(tiny, max_queue=0)  # a key; a queue that is always full
    servers = [serve_in_thread(create_app(s)) for s in (keyed, full)]
    try:
        with pytest.raises(openai.AuthenticationError):
            _ask(_client(servers[0][1], "wrong"), "x", True, False)
        assert _ask(_client(servers[0][1], KEY), "x", True, False, **GREEDY)[1] == "length"
        with pytest.raises(openai.RateLimitError):
            _ask(_client(servers[1][1]), "x", True, False)
    finally:
        for (server, _), state in zip(servers, (keyed, full)):
            server.should_exit = True
            state.engine.close()


def _wait(condition, seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _slow(monkeypatch, engine, seconds: float = 0.02):
    """Each decoding step takes `seconds` more: a reply long enough to cut."""
    step = engine.batch.step
    monkeypatch.setattr(engine.batch, "step", lambda: (time.sleep(seconds), step())[1])


def test_a_cut_stream_frees_its_row_and_errors_end_a_stream(served, monkeypatch):
    state, url = served
    _slow(monkeypatch, state.engine)
    body = {"model": NAME, "prompt": "a", "stream": True, "temperature": 0, "max_tokens": 200}
    steps = state.engine.steps
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if '"text": "' in line and '"text": ""' not in line:
                break  # the client goes away mid-reply
    assert state.engine.active <= 1 and _wait(lambda: state.engine.active == 0)
    assert state.engine.steps - steps < 199  # its row left before its 200 tokens
    steps = state.engine.steps
    with pytest.raises(httpx.TimeoutException):  # a non-streamed request whose client gives up
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    assert _wait(lambda: state.engine.active == 0) and state.engine.steps - steps < 199
    monkeypatch.undo()

    def broken():
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(state.engine.batch, "step", broken)
    chunks = []
    with pytest.raises(openai.APIError, match="fell over"):
        for chunk in _client(url).completions.create(model=NAME, prompt="a", stream=True, max_tokens=5):
            chunks.append(chunk)
    assert _ask(_client(url), "a", False, False, **GREEDY)[1] == "length"  # serving on


JSON = {"Content-Type": "application/json"}
BAD = [  # (body or raw bytes, headers, status, text in the message, param)
    (b"{not json", JSON, 400, "not valid JSON", None),
    (b"[1, 2]", JSON, 400, "JSON object", None),
    (b'{"model": "tiny", "prompt": "x"}', {"Content-Type": "text/plain"}, 400, "application/json", None),
    ({"model": NAME}, {}, 400, "messages", "messages"),
    ({"model": NAME, "messages": []}, {}, 400, "non-empty", "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "'wizard'", "messages[0]"),
    ({"model": NAME, "messages": [{"content": "x"}]}, {}, 400, "role", "messages[0]"),
    ({"model": NAME, "messages": [{"role": "user", "content": 3}]}, {}, 400, "content", "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}]}, {}, 400, "model is required", "model"),
    (
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        {},
        400,
        "[0, 2]",
        "temperature",
    ),
    (
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {},
        400,
        "[1, 200]",
        "max_tokens",
    ),
    (
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
        {},
        400,
        "[1, 200]",
        "max_tokens",
    ),
    (
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1.5},
        {},
        400,
        "integer",
        "max_completion_tokens",
    ),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, {}, 400, "(0, 1]", "top_p"),
    (
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        {},
        400,
        "true or false",
        "stream",
    ),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 2}, {}, 400, "n=1", "n"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "stop": [""]}, {}, 400, "stop", "stop"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "stop": "x" * 257}, {}, 400, "256", "stop"),
    (
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        {},
        400,
        "not supported",
        "logprobs",
    ),
    ({"model": NAME, "messages": [{"role": "user", "content": "x" * 2001}]}, {}, 400, "2001 characters", None),
    ({"model": NAME, "prompt": "x " * 250, "max_tokens": 10}, {}, 400, "256", "prompt"),  # over-long prompt
    ({"model": NAME, "prompt": "x " * 60, "max_tokens": 200}, {}, 400, "256", "max_tokens"),  # prompt + max_tokens
    ({"model": NAME, "prompt": ["a", "b"]}, {}, 400, "prompt must be", "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, {}, 404, "'gpt-4' does not exist", "model"),
    ({"model": NAME, "prompt": "x" * 20_000}, {}, 413, "at most 10000", None),
    ({"model": NAME, "prompt": "x", "temperature": 10**400}, {}, 400, "(401 characters) must be", "temperature"),
    (b'{"model": "tiny", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", JSON, 400, "too deeply", None),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}',
        JSON,
        400,
        r"\ud800 at",
        "messages[0].content",
    ),
    (b'{"model": "tiny", "prompt": "a\\udfff", "stop": "\\ud800"}', JSON, 400, "lone surrogate", "stop"),
    ({"model": NAME, "prompt": "x", "best_of": 2}, {}, 400, "best_of=1", "best_of"),
    ({"model": NAME, "prompt": "x", "presence_penalty": 1}, {}, 400, "not supported", "presence_penalty"),
    ({"model": NAME, "prompt": "x", "frequency_penalty": "x"}, {}, 400, "[-2, 2]", "frequency_penalty"),
    (
        {"model": NAME, "prompt": "x", "response_format": {"type": "json_object"}},
        {},
        400,
        "not supported",
        "response_format",
    ),
]


def _error_shape(response, status: int, text: str | None = None, param=None):
    body = response.json()
    assert response.status_code == status and set(body) == {"error"}, (response.status_code, body)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == param, body
    assert text is None or text in body["error"]["message"], body
    return body["error"]


def test_bad_requests_in_process(tiny):
    state, keyed = _state(tiny), _state(tiny, key=KEY)
    try:
        with TestClient(create_app(state)) as client, TestClient(create_app(keyed)) as locked:
            for body, headers, status, text, param in BAD:
                endpoint = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
                kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
                _error_shape(client.post(endpoint, headers=headers, **kwargs), status, text, param)
            over = client.post("/v1/completions", json={"model": NAME, "prompt": "x " * 250})
            assert _error_shape(over, 400, param="prompt")["code"] == "context_length_exceeded"
            assert re.search(r"prompt has \d{3} tokens; the model's context is 256", over.json()["error"]["message"])
            _error_shape(client.get("/v1/nothing"), 404)
            _error_shape(client.get("/v1/chat/completions"), 405)
            ok = {"model": NAME, "messages": [{"role": "user", "content": "x"}], **GREEDY}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
                assert _error_shape(locked.post("/v1/chat/completions", json=ok, headers=headers), 401)["code"]
            _error_shape(locked.get("/v1/models"), 401)
            assert locked.post("/v1/chat/completions", json=ok, headers={"Authorization": f"Bearer {KEY}"}).is_success
            reply = client.post("/v1/chat/completions", json=ok).json()  # serving on after every bad request
            assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] == 16
            assert client.get("/health").json() == {"status": "ok"} and locked.get("/health").status_code == 200
        loading = ServerState(NAME)
        with TestClient(create_app(loading)) as client:
            assert client.get("/health").status_code == 503
            _error_shape(client.post("/v1/completions", json={"model": NAME, "prompt": "x"}), 503)
    finally:
        state.engine.close()
        keyed.engine.close()


def _browser(playwright):
    """Debian's chromium, headless (Playwright never downloads a browser here); in CI a browser that cannot start
    fails the test, elsewhere it skips it."""
    executable = shutil.which("chromium")
    try:
        if executable is None:
            raise RuntimeError("no `chromium` on PATH (apt-get install chromium)")
        return playwright.chromium.launch(
            executable_path=executable, args=["--headless", "--no-sandbox", "--disable-background-networking"]
        )
    except Exception as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser did not start in CI: {e}")
        pytest.skip(f"no browser: {e}")


def test_chat_page_in_chromium(served, tiny, monkeypatch, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    state, url = served
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.set_default_timeout(15_000)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            expect(page.locator("#model")).to_have_text(NAME)
            # the event reader: a line and a multi-byte character split across reads, one byte per read
            got = page.evaluate(
                """async () => {
                    const bytes = new TextEncoder().encode('data: {"t":"é€😀"}\\n\\ndata: [DONE]\\n\\n');
                    const body = new ReadableStream({ start(c) { for (const b of bytes) c.enqueue(new Uint8Array([b]));
                                                                 c.close(); } });
                    const out = []; await readEvents(new Response(body), (d) => out.push(d)); return out; }"""
            )
            assert got == ['{"t":"é€😀"}', "[DONE]"]
            page.click("summary")  # the settings stay open
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "16")
            typed = "<img src=x onerror=alert(1)> sort: pear fig"
            page.fill("#input", typed)
            page.keyboard.press("Enter")
            reply = page.locator(".msg.assistant").last
            expect(page.locator("#send")).to_be_enabled()
            assert reply.text_content() == _alone(tiny, typed, chat=True)  # streamed in, rendered as text
            assert page.locator(".msg.user").last.text_content() == typed and page.locator("#log img").count() == 0
            # a long reply, stopped: the row leaves the batch
            _slow(monkeypatch, state.engine, 0.03)
            page.fill("#max-tokens", "150")
            page.fill("#input", "reverse: one two three")
            page.click("#send")
            expect(page.locator(".msg.assistant").last).not_to_be_empty()
            page.click("#stop")
            expect(page.locator(".note").last).to_have_text("stopped")
            assert _wait(lambda: state.engine.active == 0)
            monkeypatch.undo()
            # an error the server answers is shown; the message goes back to the input
            page.fill("#max-tokens", "100000")
            page.fill("#input", "too much")
            page.click("#send")
            expect(page.locator("#error")).to_contain_text("max_tokens=100000")
            assert page.input_value("#input") == "too much"
            assert page.locator(".msg").count() == 4  # two exchanges kept, the failed message not
            page.fill("#max-tokens", "16")
            page.fill("#input", "")
            page.reload()  # the conversation survives a reload
            expect(page.locator(".msg")).to_have_count(4)
            page.click("summary")
            page.fill("#max-tokens", "100000")
            page.fill("#input", "once more")
            page.click("#send")
            expect(page.locator("#error")).to_be_visible()
            page.click("summary")  # closed for the picture
            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot))
            print(f"chat page screenshot: {shot}")
            assert not errors, errors
        finally:
            browser.close()


def test_command_line_serves_a_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    """`python -m llm.serve <checkpoint dir>` (its functions in-process): /health answers 503 while the model loads
    in the background, then 200, and the model answers as `llm.generate` does; a wrong path, a port in use, a host
    that is no address, an API key no header can carry: one line, exit 2."""
    model, tokenizer = tiny
    ckpt = save_checkpoint(tmp_path / "ckpt", model, None, {"step": 1}, model.config.to_dict(), tokenizer)
    args = parse_args([str(ckpt), "--port", "0", "--served-model-name", NAME, "--api-key", KEY])
    server, state, loader = prepare(args, log_config=None)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: server.started)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        assert httpx.get(url + "/health").status_code == 503  # not loaded yet
        loader.start()
        assert _wait(lambda: httpx.get(url + "/health").status_code == 200, 30)
        assert _ask(_client(url, KEY), "sort: fig", True, False, **GREEDY)[0] == _alone(tiny, "sort: fig", True)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if state.engine is not None:
            state.engine.close()
    capsys.readouterr()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    for argv, env, says in [  # each one line naming the culprit, exit 2, before the model loads
        ([str(tmp_path / "missing")], "", "missing"),
        ([str(ckpt), "--port", port], "", f"--port={port}: cannot listen there"),
        ([str(ckpt), "--host", "no such host", "--port", "0"], "", "--host='no such host' is not an address"),
        ([str(ckpt), "--port", "0"], " key with spaces", "LLM_SERVE_API_KEY: the API key must be printable ASCII"),
        ([str(ckpt), "--port", "0", "--api-key", "cl\u00e9"], "", "--api-key: the API key must be printable ASCII"),
    ]:
        monkeypatch.setenv("LLM_SERVE_API_KEY", env)
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1, (argv, err)
    busy.close()
