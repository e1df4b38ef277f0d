"""Data preparation benchmark: tokens/s of `PretrainData.prepare` against the raw `tokenizers` batch encoder on the
same text with the same number of processes, and the peak memory of preparation at two corpus sizes.

    python -m llm.bench_data --sizes-mb 200 2000 --num-proc 2

For each size it writes a generated corpus (Zipf-distributed pseudo-words, one document per line, ~2 KB each) under
--work-dir, trains a 4k byte-level BPE on its first 5 MB once, then in fresh processes:
- raw: `Tokenizer.encode_batch_fast` over the same documents, split over --num-proc processes, counting tokens;
- ours: a full preparation on an empty cache (reading through `datasets`, tokenizing, writing shards), reporting
  its tokens/s and the peak RSS of the preparing process and of its largest tokenizer process.
Run by hand (minutes at 2 GB), never in the test suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from llm.data import FileCorpus, PretrainData, load_pretrained, train_bpe

DOC_WORDS = 350  # ~2 KB documents


def generate_corpus(path: Path, size_mb: float, seed: int = 0) -> Path:
    """A text file of about size_mb MB: documents of Zipf-distributed pseudo-words, one per line."""
    if path.exists() and path.stat().st_size >= size_mb * 1e6 * 0.99:
        return path
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    words = np.array(["".join(rng.choice(letters, size=int(rng.integers(1, 10)))) for _ in range(20_000)])
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            ids = np.minimum(rng.zipf(1.2, size=DOC_WORDS * 500), len(words)) - 1  # 500 documents at a time
            block = "\n".join(" ".join(doc) for doc in words[ids].reshape(500, DOC_WORDS)) + "\n"
            f.write(block)
            written += len(block)
    tmp.rename(path)
    return path


def _count_tokens(args) -> int:
    tokenizer_json, lines = args
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    return sum(len(e.ids) for e in tok.encode_batch_fast(lines, add_special_tokens=False))


def _line_chunks(path: Path, tokenizer_json: str, chunk_bytes: int = 1 << 20):
    with open(path, encoding="utf-8") as f:
        while True:
            lines = f.readlines(chunk_bytes)
            if not lines:
                return
            yield tokenizer_json, [line.rstrip("\n") for line in lines]


def raw_tokens_per_s(path: Path, tokenizer_dir: str, num_proc: int) -> dict:
    """The raw encoder's throughput: read lines, encode_batch_fast over num_proc processes, count tokens."""
    tokenizer_json = load_pretrained(tokenizer_dir).backend_tokenizer.to_str()
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(num_proc, initializer=_one_thread) as pool:
        tokens = sum(pool.imap(_count_tokens, _line_chunks(path, tokenizer_json), chunksize=1))
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def _one_thread() -> None:
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _prepare(path: str, tokenizer_dir: str, cache_dir: str, num_proc: int, queue) -> None:
    tokenizer = load_pretrained(tokenizer_dir)
    t0 = time.perf_counter()
    data = PretrainData(tokenizer, FileCorpus(path), seq_len=1024, cache_dir=cache_dir, num_proc=num_proc).prepare()
    seconds = time.perf_counter() - t0
    tokens = sum(data.meta["num_tokens"].values())
    queue.put({"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
               "tokenize_tokens_per_s": data.meta["tokens_per_s"],
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})


def prepare_in_fresh_process(path: Path, tokenizer_dir: str, cache_dir: Path, num_proc: int) -> dict:
    """A full preparation on an empty cache in a new process, so its peak RSS is its own."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_prepare, args=(str(path), tokenizer_dir, str(cache_dir), num_proc, queue))
    proc.start()
    result = queue.get()
    proc.join()
    shutil.rmtree(cache_dir, ignore_errors=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[200, 2000])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/llm-bench-data")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report = {}
    tokenizer_dir = None
    for size in args.sizes_mb:
        corpus = generate_corpus(work / f"corpus_{size:g}mb.txt", size)
        if tokenizer_dir is None:  # one tokenizer for every size: trained on the first corpus's first 5 MB
            tokenizer = train_bpe(FileCorpus(str(corpus)), vocab_size=4096, cache_dir=str(work / "tok"),
                                  max_train_bytes=5_000_000)
            tokenizer_dir = str(work / "tokenizer")
            tokenizer.save_pretrained(tokenizer_dir)
        raw = raw_tokens_per_s(corpus, tokenizer_dir, args.num_proc)
        ours = prepare_in_fresh_process(corpus, tokenizer_dir, work / "cache", args.num_proc)
        report[f"{size:g}MB"] = {"raw": raw, "prepare": ours,
                                 "prepare_over_raw": round(ours["tokens_per_s"] / raw["tokens_per_s"], 3)}
        print(json.dumps({f"{size:g}MB": report[f"{size:g}MB"]}), flush=True)
    sizes = list(report)
    if len(sizes) > 1:
        first, last = report[sizes[0]]["prepare"], report[sizes[-1]]["prepare"]
        report["peak_rss_ratio"] = round(last["peak_rss_mb"] / first["peak_rss_mb"], 3)
        print(json.dumps({"peak_rss_ratio": report["peak_rss_ratio"]}))
    return report


if __name__ == "__main__":
    main()
