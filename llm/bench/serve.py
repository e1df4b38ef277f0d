"""Serving benchmark: `python -m llm.serve`'s server (continuous batching on the KV cache) under 1, 4 and 16
concurrent streaming clients, against the same requests sent one by one, and against a server that runs HF
`generate` with a `TextIteratorStreamer` one request at a time (what minimind's server does), all in one process,
as completion tokens per second and time to first token.

    python -m llm.bench.serve                                   # tiny preset, 32 requests x 64 tokens, CPU
    python -m llm.bench.serve --requests 48 --max-tokens 96 --clients 1 4 16 --threads 1 --json serve.json

The model is a preset of conf/model/ with random weights and a byte-level BPE trained in a second on built-in task
rows (its vocabulary is the model's). Requests are completions of prompts of different lengths, sampled at
temperature 1 with a seed each, so every mode generates the same tokens (the counts are checked equal). Each
client streams its reply over HTTP (httpx) from a server on 127.0.0.1 in a thread of this process; a mode's clients
share the request list. Run by hand, never in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from llm.bench.generate import build_models
from llm.data import VerifiableTasks, train_bpe
from llm.data.sources import FileCorpus
from llm.serve.app import ServerState, create_app
from llm.serve.cli import context_of, serve_in_thread
from llm.serve.engine import Engine
from llm.serve.protocol import Limits

NAME = "bench"


def tokenizer_for_bench(vocab_size: int):
    tmp = Path(tempfile.mkdtemp(prefix="llm-bench-serve-"))
    rows = [r for _, r in VerifiableTasks(num_examples=3000).rows()]
    (tmp / "corpus.txt").write_text("\n".join(f"{r['prompt']} {r['response']}" for r in rows))
    return train_bpe(FileCorpus(str(tmp / "corpus.txt")), vocab_size=vocab_size, cache_dir=str(tmp / "cache"))


def requests_for_bench(n: int, max_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "sort reverse add the list of words apple pear fig kiwi plum one two three four five".split()
    return [
        {
            "model": NAME,
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))),
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": i,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(n)
    ]


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one streamed request."""
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url}: {response.status_code} {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - start), tokens


async def _drive(url: str, bodies: list[dict], clients: int) -> dict:
    """`clients` concurrent clients working through `bodies`; tokens/s over the wall time, TTFT median and p90."""
    pending = list(bodies)
    results = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:

        async def worker():
            while pending:
                results.append(await _one(client, url + "/v1/completions", pending.pop(0)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_median_s": round(statistics.median(ttft), 4),
        "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 4),
    }


def hf_streamer_app(hf, tokenizer):
    """A minimal server on HF `generate` + `TextIteratorStreamer`: one request at a time under a lock, the reply
    streamed as the streamer yields text (minimind's design); its usage chunk counts the generated tokens."""
    from transformers import TextIteratorStreamer

    app, lock = FastAPI(), threading.Lock()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids = torch.tensor([tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]])

        def events():
            with lock:
                streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                done = {}
                torch.manual_seed(body["seed"])

                def run():
                    done["out"] = hf.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=body["max_tokens"],
                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, streamer=streamer,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
                    )  # fmt: skip

                thread = threading.Thread(target=run)
                thread.start()
                for text in streamer:
                    yield f"data: {json.dumps({'choices': [{'text': text}]})}\n\n"
                thread.join()
                usage = {"completion_tokens": done["out"].size(1) - ids.size(1)}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(iterate_in_threadpool(events()), media_type="text/event-stream")

    return app


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = tokenizer_for_bench(args.vocab_size)
    ours, hf = build_models(args.model, len(tokenizer), "cpu", torch.float32)
    state = ServerState(NAME, Limits(max_tokens=args.max_tokens))
    state.ready(
        Engine(ours, tokenizer, max_batch=max(args.clients), max_queue=args.requests), tokenizer, context_of(ours)
    )
    server, url = serve_in_thread(create_app(state))
    bodies = requests_for_bench(args.requests, args.max_tokens)
    result = {"model": args.model, "vocab_size": len(tokenizer), "threads": torch.get_num_threads(), "modes": {}}
    try:
        asyncio.run(_drive(url, bodies[:2], 2))  # warm-up
        for clients in args.clients:
            result["modes"][f"ours_{clients}"] = asyncio.run(_drive(url, bodies, clients))
        if not args.no_hf:
            hf_server, hf_url = serve_in_thread(hf_streamer_app(hf, tokenizer))
            try:
                clients = max(args.clients)
                result["modes"][f"hf_streamer_{clients}"] = asyncio.run(_drive(hf_url, bodies, clients))
            finally:
                hf_server.should_exit = True
    finally:
        server.should_exit = True
        state.engine.close()
    modes = result["modes"]
    one = modes[f"ours_{min(args.clients)}"]["tokens_per_s"]
    result["speedup_over_one_by_one"] = {k: round(v["tokens_per_s"] / one, 2) for k, v in modes.items()}
    counts = {v["completion_tokens"] for k, v in modes.items() if k.startswith("ours")}
    result["same_tokens_in_every_mode"] = len(counts) == 1
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a preset of conf/model/ or a model yaml")
    parser.add_argument("--vocab-size", type=int, default=1024, help="of the BPE trained for the benchmark")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per mode")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate + streamer server")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
