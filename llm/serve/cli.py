"""`python -m llm.serve <model>`: the OpenAI-compatible server and its chat page.

    python -m llm.serve outputs/2026-01-01/12-00-00              # a run dir (its newest checkpoint), 127.0.0.1:8000
    python -m llm.serve latest:sft --port 8080 --max-batch 32    # the newest task=sft run under outputs/
    LLM_SERVE_API_KEY=secret python -m llm.serve <HF dir> --host 0.0.0.0    # reachable from others: with a key

The model is any source `python -m llm.generate` takes (run dir, checkpoint dir, latest:/best:<task>, HF model dir,
hub name, a LoRA run's checkpoint); it is resolved before the server starts (a wrong path is one line, exit 2) and
loaded while the server already answers (GET /health: 503, then 200). Nothing is written.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
import time

import torch
import uvicorn
from loguru import logger

from llm.data.chat import reserved_chat_template
from llm.errors import ConfigError, LLMError
from llm.serve.app import ServerState, create_app
from llm.serve.engine import Engine
from llm.serve.protocol import Limits
from llm.tasks.source import ModelSource

API_KEY_ENV = "LLM_SERVE_API_KEY"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m llm.serve", description=__doc__.splitlines()[0])
    p.add_argument("model", help="run dir, checkpoint dir, latest:<task>, best:<task>, HF model dir or hub name")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer <key>' (or set {API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the model arg)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: as saved")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoding together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting to join; more get 429")
    p.add_argument("--max-tokens", type=int, default=4096, help="the most max_tokens a request may ask for")
    p.add_argument("--max-messages", type=int, default=256, help="messages in one chat request")
    p.add_argument("--max-chars", type=int, default=200_000, help="characters of a request's messages or prompt")
    return p.parse_args(argv)


def check_args(args) -> None:
    for key in ("port", "max_batch", "max_queue", "max_tokens", "max_messages", "max_chars"):
        low = 0 if key == "port" else 1
        value = getattr(args, key)
        if value < low or (key == "port" and value > 65535):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag}={value} must be {'in [0, 65535]' if key == 'port' else '>= 1'}")


def check_address(host: str, port: int) -> None:
    """--host and --port can be bound here, found out before the model loads (uvicorn's own failure comes after
    it, as a log line and exit 3)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host={host!r} is not an address or host name ({e}); e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"--host={host} --port={port}: cannot listen there ({e.strerror or e})") from None


def check_api_key(key: str | None, source: str) -> str | None:
    """The key clients send as 'Authorization: Bearer <key>': printable ASCII without spaces (an HTTP header
    carries nothing else intact), or None (no key) when unset or empty."""
    if not key:
        return None
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise ConfigError(
            f"{source}: the API key must be printable ASCII without spaces (it travels in an HTTP header)"
        )
    return key


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: CUDA is not available on this machine")
    return device


def context_of(model) -> int:
    """Positions the model is meant for: its trained context (RoPE: times its scaling factor)."""
    if model.rope is not None:
        return model.rope.context_limit(model.config.max_seq_len)
    return model.config.max_seq_len


def load(state: ServerState, source: ModelSource, device, dtype, max_batch: int, max_queue: int) -> Engine:
    """Load the source's model and start the engine; the state is ready afterwards."""
    start = time.time()
    model, tokenizer = source.load()
    model = model.to(device, dtype=getattr(torch, dtype)) if dtype else model.to(device)
    reserved_chat_template(tokenizer)  # a pretrained model whose vocabulary reserves the chat tokens can chat
    engine = Engine(model.eval(), tokenizer, max_batch, max_queue)
    state.ready(engine, tokenizer, context_of(model))
    logger.info(f"loaded {source.path} in {time.time() - start:.1f}s on {device}: context {state.context} tokens")
    return engine


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Start uvicorn on `app` in a thread (port 0: a free one); returns (server, its base URL). Stop it with
    `server.should_exit = True`."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    return server, f"http://{bound[0]}:{bound[1]}"


def prepare(args, log_config=uvicorn.config.LOGGING_CONFIG) -> tuple[uvicorn.Server, ServerState, threading.Thread]:
    """The server (not started), its state, and the thread that loads the model into it (not started): the
    model's source is resolved here, so a wrong path fails before anything binds. `log_config`: uvicorn's logging
    (None: leave the process's logging as it is)."""
    check_args(args)
    device = device_of(args.device)
    source = ModelSource.resolve(args.model, key="model")
    if args.api_key is not None:
        api_key = check_api_key(args.api_key, "--api-key")
    else:
        api_key = check_api_key(os.environ.get(API_KEY_ENV), API_KEY_ENV)
    check_address(args.host, args.port)
    if not _loopback(args.host) and api_key is None:
        logger.warning(f"--host {args.host} without an API key: anyone who reaches this port can use the model")
    limits = Limits(args.max_tokens, args.max_messages, args.max_chars)
    state = ServerState(args.served_model_name or args.model, limits, api_key)
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="info", log_config=log_config)
    server = uvicorn.Server(config)

    def load_in_background() -> None:
        try:
            load(state, source, device, args.dtype, args.max_batch, args.max_queue)
        except Exception as e:
            state.failed = str(e).splitlines()[0] if str(e) else type(e).__name__
            logger.error(f"loading {args.model} failed: {state.failed}")
            server.should_exit = True

    return server, state, threading.Thread(target=load_in_background, daemon=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        server, state, loader = prepare(args)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loader.start()
    logger.info(f"serving {args.model} as {state.model_name!r} on {args.host}:{args.port} (the chat page at /)")
    server.run()
    if state.engine is not None:
        state.engine.close()
    return 1 if state.failed else 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    sys.exit(main())
