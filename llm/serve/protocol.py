"""The OpenAI request bodies the server takes, checked by hand (every field's type and range, the sizes a client may
send), and the error shape it answers with: `{"error": {"message", "type", "param", "code"}}`, as OpenAI and vLLM
send it, with 400 for any invalid request (never 422). Unknown fields are ignored, as vLLM does; fields this
server cannot honour (n > 1, logprobs, tools, penalties, a JSON response_format, ...) are a 400 naming the field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "tools", "functions", "logit_bias", "suffix")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client: HTTP status and the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int = 4096  # the most max_tokens / max_completion_tokens a request may set
    max_messages: int = 256  # messages in one chat request
    max_chars: int = 200_000  # characters of all messages (or the prompt) together
    max_body_bytes: int = 2**21  # the request body
    max_stop: int = 4  # stop strings (OpenAI's limit)
    max_stop_chars: int = 256  # characters of one stop string (each step looks for its start at the text's end)


@dataclass
class Params:
    """A request's checked settings (chat: `messages`; completion: `prompt`)."""

    model: str
    stream: bool = False
    include_usage: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None  # None: up to the context (at most Limits.max_tokens)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    messages: list[dict] | None = None
    prompt: str | None = None


def parse_json(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_body_bytes:
        raise APIError(413, f"the request body has {len(raw)} bytes; the server takes at most {limits.max_body_bytes}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body nests its arrays or objects too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _number(body: dict, key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (isinstance(value, int) or math.isfinite(value))
    )
    if not ok or value > high or (value <= low if low_open else value < low):  # an int of any size compares
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{key}={shown(value)} must be a number in {bounds}", key)
    return float(value)


def shown(value) -> str:
    """A client's value in an error message, cut short (a 2 MiB string or a 400-digit number is not repeated)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + f"... ({len(text)} characters)"


def _int(body: dict, key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise APIError(400, f"{key}={shown(value)} must be an integer in [{low}, {high}]", key)
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{key}={shown(value)} must be true or false", key)
    return value


def check_common(body: dict, limits: Limits) -> Params:
    """The fields both endpoints share."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required: the name GET /v1/models lists", "model")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}, ""):
            raise APIError(400, f"{key} is not supported by this server", key)
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1) or isinstance(body.get(key), bool):
            raise APIError(400, f"{key}={shown(body[key])}: this server returns one choice per request ({key}=1)", key)
    for key in ("presence_penalty", "frequency_penalty"):  # OpenAI's range; only their default is honoured
        if _number(body, key, -2, 2):
            raise APIError(400, f"{key}={shown(body[key])} is not supported by this server (only 0)", key)
    for key, default in (("response_format", {"type": "text"}), ("tool_choice", "none")):  # no JSON mode, no tools
        if body.get(key) not in (None, default) and not (key == "tool_choice" and body[key] == "auto"):
            raise APIError(400, f"{key}={shown(body[key])} is not supported by this server", key)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens"
    if max_tokens is None:
        key = "max_tokens"
    max_tokens = _int(body, key, 1, limits.max_tokens)
    top_k = _int(body, "top_k", -1, 2**31 - 1)
    params = Params(
        model=model,
        stream=_bool(body, "stream"),
        include_usage=_bool(options or {}, "include_usage"),
        temperature=_number(body, "temperature", 0, 2) if body.get("temperature") is not None else 1.0,
        top_p=_number(body, "top_p", 0, 1, low_open=True),
        top_k=top_k if top_k and top_k > 0 else None,
        max_tokens=max_tokens,
        stop=_stop(body.get("stop"), limits),
        seed=_int(body, "seed", 0, 2**63 - 1),
    )
    return params


def _stop(value, limits: Limits) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    ok = isinstance(stops, list) and len(stops) <= limits.max_stop
    if not ok or not all(isinstance(s, str) and 0 < len(s) <= limits.max_stop_chars for s in stops):
        raise APIError(400, f"stop must be a string of 1 to {limits.max_stop_chars} characters or a list of at most "
                       f"{limits.max_stop} of them", "stop")  # fmt: skip
    return tuple(_text(s, "stop") for s in stops)


def check_chat(body: dict, limits: Limits) -> Params:
    """POST /v1/chat/completions: the common fields and `messages` (roles system / user / assistant; content a
    string or a list of text parts)."""
    params = check_common(body, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"{len(messages)} messages; the server takes at most {limits.max_messages}", "messages")
    out, chars = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", where)
        if m["role"] not in ROLES:
            raise APIError(400, f"{where}.role={shown(m['role'])} is not allowed; choose one of {list(ROLES)}", where)
        content = _content(m.get("content"), where)
        chars += len(content)
        out.append({"role": m["role"], "content": content})
    if chars > limits.max_chars:
        raise APIError(400, f"the messages have {chars} characters; the server takes at most {limits.max_chars}")
    params.messages = out
    return params


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return _text(content, f"{where}.content")
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return _text("".join(p["text"] for p in content), f"{where}.content")
    raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _text(text: str, param: str) -> str:
    """`text` if it is Unicode text; a lone UTF-16 surrogate (JSON's "\\ud800" alone: no character) is a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = f"\\u{ord(text[e.start]):04x}"
        raise APIError(400, f"{param} holds a lone surrogate ({bad} at character {e.start}): not text", param) from None
    return text


def check_completion(body: dict, limits: Limits) -> Params:
    """POST /v1/completions: the common fields and `prompt` (a string, or a list of one string)."""
    params = check_common(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (or a list of one string)", "prompt")
    _text(prompt, "prompt")
    if len(prompt) > limits.max_chars:
        raise APIError(400, f"the prompt has {len(prompt)} characters; the server takes at most {limits.max_chars}")
    params.prompt = prompt
    return params
