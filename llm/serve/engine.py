"""The server's generation worker: one thread owns the model and a `RunningBatch` (continuous batching on the KV
cache). Requests wait in a bounded queue; before every step the worker drops the rows whose client went away,
lets waiting requests join (up to `max_batch` rows), then decodes one token for every row. Each request's text is
decoded incrementally and handed to its `emit` callback (from the worker thread: the server passes a callback that
hands it to its event loop), so nothing of generation runs on the server's event loop.

Events a request receives, in order: ("text", str) pieces, then ("done", finish_reason, usage) or ("error",
message). Text is held back while it ends in an incomplete multi-byte character or in what may be the start of a
stop string; a stop string is never sent. Text is decoded incrementally over a short window of recent tokens, so a
step costs the same at the 10th token of a reply as at the 4000th.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from loguru import logger

from llm.model.batching import RunningBatch, Sampling


class QueueFull(Exception):
    """The engine's queue is full: the client should retry later (HTTP 429)."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[..., None]  # emit(kind, *payload), called from the worker thread
    stop_ids: frozenset = frozenset()  # tokens that end the reply (not part of its text)
    stop: tuple[str, ...] = ()  # strings that end the reply (not part of its text)
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ids: list[int] = field(default_factory=list)  # generated so far
    text: str = ""  # the decoded text of `ids` (complete characters)
    shown: str = ""  # text emitted so far
    prefix_offset: int = 0  # decoding window: ids[prefix_offset:read_offset] were read before
    read_offset: int = 0
    cancelled: bool = False
    first_token_at: float | None = None

    def cancel(self) -> None:
        """The client went away: the worker drops the row before its next step."""
        self.cancelled = True


class Engine:
    """Continuous batching of `Request`s on `model` with `tokenizer` (decoding only). `submit` raises QueueFull
    when `max_queue` requests are already waiting."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.batch = RunningBatch(model)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closed = False
        self.steps = 0  # decoding steps so far (a step of B rows counts once)
        self.peak = 0  # the most rows that decoded together
        self.thread = threading.Thread(target=self._loop, name="llm-serve-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the server's --max-queue)")
            self.waiting.append(request)
        self.wake.set()

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return len(self.running)

    def close(self) -> None:
        self.closed = True
        self.wake.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self.closed:
            try:
                self._iteration()
            except Exception as e:  # the whole batch fails (e.g. out of memory): its clients are told, then on
                logger.exception("decoding step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def _iteration(self) -> None:
        """Drop the rows whose client went away, let waiting requests join, decode one token for every row."""
        self._drop_cancelled()
        self._admit()
        if not self.running:
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            return
        self.peak = max(self.peak, len(self.running))
        tokens = self.batch.step()
        self.steps += 1
        done = [key for key, token in zip(self.batch.keys(), tokens) if self._advance(self.running[key], token)]
        self._leave(done)

    def _drop_cancelled(self) -> None:
        gone = [key for key, r in self.running.items() if r.cancelled]
        self._leave(gone)
        with self.lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)

    def _admit(self) -> None:
        """Waiting requests join the batch (each prompt read alone), up to max_batch rows."""
        while len(self.running) < self.max_batch:
            with self.lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                continue
            key = id(request)
            generator = None
            if request.temperature != 0:
                seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()).item())
                generator = torch.Generator(device=self.batch.device).manual_seed(seed)
            sampling = Sampling(request.temperature, request.top_k, request.top_p, generator)
            try:
                token = self.batch.join(key, request.prompt_ids, sampling)
            except Exception as e:
                logger.exception("reading a prompt failed")
                request.emit("error", f"generation failed: {type(e).__name__}: {e}")
                continue
            self.running[key] = request
            request.first_token_at = time.perf_counter()
            if self._advance(request, token):
                self._leave([key])

    def _leave(self, keys) -> None:
        if keys:
            self.batch.leave(keys)
            for key in keys:
                self.running.pop(key, None)

    def _fail_all(self, message: str) -> None:
        for request in self.running.values():
            request.emit("error", message)
        self._leave(list(self.running))
        self.batch = RunningBatch(self.model)

    def _advance(self, r: Request, token: int) -> bool:
        """Add a generated token to `r`: emit the text it completes; True when the reply is finished."""
        if r.cancelled:
            return True
        stopped = token in r.stop_ids
        if not stopped:
            r.ids.append(token)
        finish = "stop" if stopped else "length" if len(r.ids) >= r.max_tokens else None
        self._detokenize(r, final=finish is not None)
        text = r.text
        cut = min((at for s in r.stop if (at := text.find(s, max(0, len(r.shown) - len(s)))) >= 0), default=-1)
        if cut >= 0:  # a stop string: the text ends before it
            text, finish = text[: max(cut, len(r.shown))], "stop"
        elif finish is None:  # hold back what may be the start of a stop string
            text = text[: len(text) - _held(text, r.stop)]
        if len(text) > len(r.shown):
            r.emit("text", text[len(r.shown) :])
            r.shown = text
        if finish is not None:
            generated = len(r.ids) + int(stopped)
            usage = {
                "prompt_tokens": len(r.prompt_ids),
                "completion_tokens": generated,
                "total_tokens": len(r.prompt_ids) + generated,
            }
            r.emit("done", finish, usage)
            return True
        return False

    def _detokenize(self, r: Request, final: bool) -> None:
        """Extend r.text with the characters the new tokens complete, decoding a short window of recent tokens
        (not the whole reply each step): the window's text minus the text of its first, already read tokens
        (which keeps tokenizers that drop a leading space right). An incomplete multi-byte character waits for
        the next token, except at the end of the reply."""
        window = self.tokenizer.decode(r.ids[r.prefix_offset :], skip_special_tokens=True)
        before = self.tokenizer.decode(r.ids[r.prefix_offset : r.read_offset], skip_special_tokens=True)
        if len(window) > len(before) and (final or not window.endswith("\ufffd")):
            r.text += window[len(before) :]
            r.prefix_offset, r.read_offset = r.read_offset, len(r.ids)


def _held(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may begin a stop string (kept until the next token decides)."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held
