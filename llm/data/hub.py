"""Reaching the Hugging Face hub: a hub name fails in seconds with one line when the hub cannot be reached.

Without a route to the hub, `datasets`, `transformers` and `huggingface_hub` retry every file for tens of seconds
and log each retry. `hub_call` first asks once per process whether the hub is reachable (HF_HUB_OFFLINE=1 says
no at once; else a TCP connection to the endpoint, a few seconds at most, DNS included). When it is not, the
libraries are switched to offline mode for the rest of the process, so a name already in the local Hugging Face
cache still loads, and one that is not becomes one error naming the key, the name and why.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlparse

from llm.errors import DataError

PROBE_SECONDS = 3.0  # DNS + TCP connect to the hub endpoint
_TRUE = {"1", "ON", "YES", "TRUE"}


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _connect(host: str, port: int, outcome: list) -> None:
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
        outcome.append(None)
    except OSError as e:
        outcome.append(e.strerror or str(e) or type(e).__name__)


@functools.lru_cache(maxsize=1)
def offline_reason() -> str | None:
    """Why the hub cannot be reached (None when it can), asked once per process."""
    if any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return "the hub is offline (HF_HUB_OFFLINE=1)"
    url = urlparse(_endpoint())
    outcome: list = []
    # in a thread: name resolution has no timeout of its own
    probe = threading.Thread(
        target=_connect, args=(url.hostname, url.port or (80 if url.scheme == "http" else 443), outcome), daemon=True
    )
    probe.start()
    probe.join(PROBE_SECONDS + 1)
    if outcome and outcome[0] is None:
        return None
    why = outcome[0] if outcome else "no answer"
    return f"the hub ({_endpoint()}) cannot be reached: {why}"


def go_offline() -> None:
    """Offline mode for this process's Hugging Face libraries (and the processes it starts): no request, no retry."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
    except ImportError:  # pragma: no cover - datasets is a core dependency
        return
    datasets.config.HF_HUB_OFFLINE = True


def hub_call(key: str, name: str, load, error: type[Exception] = DataError):
    """`load()` (which fetches `name` from the hub or its local cache); when the hub cannot be reached and `name` is
    not in the local cache, `error` naming `key` and `name` instead of minutes of retries."""
    reason = offline_reason()
    if reason is None:
        return load()
    go_offline()
    try:
        return load()
    except Exception as e:
        raise error(f"{key}={name}: not in the local Hugging Face cache and {reason}") from e
