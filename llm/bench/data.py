"""Data preparation benchmark: tokens/s of `PretrainData.prepare` against the raw `tokenizers` batch encoder on the
same text with the same number of processes, and the peak memory of preparation at several corpus sizes.

    python -m llm.bench.data                                  # 200 MB and 2 GB, 2 processes (minutes)
    python -m llm.bench.data --sizes-mb 200 2000 --num-proc 2 --json bench_data.json

For each size it generates a corpus deterministically (Zipf-distributed pseudo-words, one document per line of
50-700 words) in a temporary dir (removed at the end unless --keep), with one tokenizer for all sizes (--tokenizer,
or a byte-level BPE of 4096 trained on the first 5 MB of the first corpus), then measures:
- raw: `Tokenizer.encode_batch_fast` (no offsets: the fastest batch call, the one preparation uses) in --num-proc
  processes, each reading its own contiguous part of the file in ~1 MB batches of lines, counting the tokens of
  every document plus one EOS per non-empty document (what preparation writes); nothing else.
- prepare: a full preparation of the file (`FileCorpus` -> `PretrainData.prepare()`, empty cache, --num-proc) in
  a fresh process, timed inside it from the call to its return (checking the file, reading, tokenizing, writing
  shards and index); and the peak RSS of that process with its tokenizer processes, summed (/proc/<pid>/status
  VmRSS of the tree sampled every 50 ms: pages shared by the forked processes count once per process, so it
  overstates the memory used; the preparing process alone is reported too).
Both sides run every tokenizer single-threaded (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1), so N processes
use N cores; the preparing process's own reading and writing is extra work on top (on a machine with exactly N cores
it competes with the tokenizers). The two token counts must agree (`same_tokens`). Run by hand, never in the suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from llm.data import FileCorpus, PretrainData, load_pretrained, train_bpe

THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}  # one thread per tokenizer process
BATCH_BYTES = 1 << 20  # text per encode_batch_fast call of the raw side (preparation's CHUNK_BYTES)
TOKENIZER_SAMPLE, VOCAB_SIZE = 5_000_000, 4096  # the BPE: trained on this many bytes of the first corpus
SAMPLE_MS = 50  # RSS sampling period (the sampler costs about 1% of a core)
PREPARE_CONTEXT = "spawn"  # preparation runs in a fresh interpreter: its memory is its own

_raw: dict = {}  # the tokenizer of a raw encoder process


# ---------------------------------------------------------------------------------------------- the corpus
def generate_corpus(path: Path, size_mb: float, seed: int = 0) -> Path:
    """About size_mb MB of text: documents of 50-700 Zipf-distributed pseudo-words (a-z, 1-12 letters), one per
    line. Deterministic in the seed; built with numpy a few MB at a time."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    letter_p = 1.0 / np.arange(1, 27) ** 0.8
    vocab, width = 30_000, 13  # each word: up to 12 letters, then its separator, zero-padded to a fixed width
    lengths = rng.integers(1, 13, size=vocab)
    table = rng.choice(letters, size=(vocab, width), p=letter_p / letter_p.sum())
    table[np.arange(width) >= lengths[:, None]] = 0
    word_p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    cdf = np.cumsum(word_p / word_p.sum())
    target, written, per_block = int(size_mb * 1e6), 0, 1_000_000  # words per block: ~6 MB of text
    with open(path, "wb") as f:
        while written < target:
            ids = np.minimum(np.searchsorted(cdf, rng.random(per_block)), vocab - 1)
            words = table[ids]
            words[np.arange(per_block), lengths[ids]] = ord(" ")  # the separator after each word's letters
            ends = np.cumsum(rng.integers(50, 701, size=per_block // 50))
            ends = ends[ends <= per_block] - 1  # the last word of each document
            words[ends, lengths[ids[ends]]] = ord("\n")
            text = words[: ends[-1] + 1].ravel()
            text = text[text != 0].tobytes()
            if written + len(text) > target:  # stop at the end of the document that reaches the target
                text = text[: text.find(b"\n", target - written - 1) + 1]
            f.write(text)
            written += len(text)
    return path


# ---------------------------------------------------------------------------------------------- raw encoder
def _raw_init(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    os.environ.update(THREAD_ENV)
    _raw["tokenizer"] = Tokenizer.from_str(tokenizer_json)


def _raw_part(args) -> tuple[int, int]:
    """(tokens, non-empty documents) of the lines that start in bytes [start, end) of the file."""
    path, start, end = args
    tokens = documents = 0
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line holding byte start - 1 is the previous part's
        pos = f.tell()
        while pos < end:
            data = f.read(BATCH_BYTES) + f.readline()
            if not data:
                break
            if pos + len(data) > end:  # stop after the line holding byte end - 1
                cut = data.find(b"\n", end - 1 - pos)
                data = data if cut < 0 else data[: cut + 1]
            pos += len(data)
            texts = data.decode("utf-8").split("\n")
            if not texts[-1]:
                texts.pop()
            tokens += sum(map(len, _raw["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)))
            documents += sum(1 for t in texts if t.strip())
            if pos >= end:
                break
    return tokens, documents


def raw_encoder(path: Path, tokenizer_json: str, num_proc: int) -> dict:
    """The raw encoder's throughput over num_proc processes, each encoding its own part of the file."""
    size = path.stat().st_size
    parts = [(str(path), size * i // num_proc, size * (i + 1) // num_proc) for i in range(num_proc)]
    t0, cpu0 = time.perf_counter(), _cpu_s(resource.RUSAGE_CHILDREN)
    pool = multiprocessing.get_context("fork").Pool(num_proc, _raw_init, (tokenizer_json,))
    counts = pool.map(_raw_part, parts, chunksize=1)
    pool.close()
    pool.join()  # waited for: their CPU time is in RUSAGE_CHILDREN
    seconds = time.perf_counter() - t0
    tokens = sum(t + d for t, d in counts)  # + one EOS per non-empty document, as preparation writes
    cpu = _cpu_s(resource.RUSAGE_CHILDREN) - cpu0
    return {
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "cpu_s": round(cpu, 1),
        "tokens_per_cpu_s": round(tokens / max(cpu, 1e-3)),
    }


# ---------------------------------------------------------------------------------------------- preparation
def _prepare(path: str, tokenizer_dir: str, cache_dir: str, num_proc: int, queue) -> None:
    os.environ.update(THREAD_ENV)
    tokenizer = load_pretrained(tokenizer_dir)
    t0, cpu0 = time.perf_counter(), _cpu_s(resource.RUSAGE_SELF)
    data = PretrainData(tokenizer, FileCorpus(path), seq_len=1024, cache_dir=cache_dir, num_proc=num_proc).prepare()
    seconds = time.perf_counter() - t0
    cpu_main = _cpu_s(resource.RUSAGE_SELF) - cpu0  # reading, handing out, writing
    cpu = cpu_main + _cpu_s(resource.RUSAGE_CHILDREN)  # + the tokenizer processes
    tokens = sum(data.meta["num_tokens"].values())
    queue.put(
        {
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds),
            "tokenizing_tokens_per_s": data.meta["tokens_per_s"],  # the tokenizing loop alone
            "cpu_s": round(cpu, 1),
            "tokens_per_cpu_s": round(tokens / max(cpu, 1e-3)),
            "cpu_s_main": round(cpu_main, 1),
        }
    )


def _cpu_s(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its finished children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):  # gone, or a zombie
        return 0


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):  # a pool's workers are forked by one of its threads
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


class TreeRSS(threading.Thread):
    """Samples the VmRSS of a process and of all its descendants until stopped; keeps the peaks (MB)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stopped = pid, threading.Event()
        self.peak_tree_mb = self.peak_main_mb = self.peak_child_mb = 0.0

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_MS / 1000):
            pids, tree = [self.pid], []
            while pids:
                pid = pids.pop()
                tree.append((pid, _rss_kb(pid) / 1024))
                pids += _children(pid)
            self.peak_tree_mb = max(self.peak_tree_mb, sum(rss for _, rss in tree))
            self.peak_main_mb = max(self.peak_main_mb, tree[0][1])
            self.peak_child_mb = max([self.peak_child_mb] + [rss for _, rss in tree[1:]])


def prepare_in_fresh_process(path: Path, tokenizer_dir: str, cache_dir: Path, num_proc: int) -> dict:
    """A full preparation on an empty cache in a new process (as `python run.py` would run it), watched for RSS."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    ctx = multiprocessing.get_context(PREPARE_CONTEXT)
    queue = ctx.Queue()
    proc = ctx.Process(target=_prepare, args=(str(path), tokenizer_dir, str(cache_dir), num_proc, queue))
    proc.start()
    watch = TreeRSS(proc.pid)
    watch.start()
    try:
        result = queue.get()
    finally:
        watch.stopped.set()
        proc.join()
        watch.join()
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        **result,
        "peak_rss_mb": round(watch.peak_tree_mb),
        "peak_rss_main_mb": round(watch.peak_main_mb),
        "peak_rss_largest_worker_mb": round(watch.peak_child_mb),
    }


# ---------------------------------------------------------------------------------------------- the report
def the_tokenizer(name: str | None, corpus: Path, work: Path) -> tuple[str, str]:
    """The tokenizer `name` (a dir or hub name), or else a byte-level BPE trained on the corpus's first
    TOKENIZER_SAMPLE bytes: saved under `work` (what preparation loads) and its JSON (what the raw side loads)."""
    if name:
        tokenizer = load_pretrained(name)
    else:
        sample = work / "tokenizer_sample.txt"
        with open(corpus, "rb") as f:
            head = f.read(TOKENIZER_SAMPLE)
        sample.write_bytes(head[: head.rfind(b"\n") + 1] or head)
        tokenizer = train_bpe(FileCorpus(str(sample)), vocab_size=VOCAB_SIZE, cache_dir=str(work / "cache"))
    tokenizer.save_pretrained(str(work / "tokenizer"))
    return str(work / "tokenizer"), tokenizer.backend_tokenizer.to_str()


def measure(corpus: Path, tokenizer: tuple[str, str], work: Path, num_proc: int) -> dict:
    raw = raw_encoder(corpus, tokenizer[1], num_proc)
    ours = prepare_in_fresh_process(corpus, tokenizer[0], work / "cache" / "prepare", num_proc)
    return {
        "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
        "num_proc": num_proc,
        "raw": raw,
        "prepare": ours,
        "prepare_over_raw": round(ours["tokens_per_s"] / raw["tokens_per_s"], 3),
        "same_tokens": raw["tokens"] == ours["tokens"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[200, 2000], help="corpus sizes (MB)")
    parser.add_argument("--num-proc", type=int, default=2, help="tokenizer processes on both sides")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer dir or hub name (default: a BPE of 4096 trained on the first 5 MB of the first corpus)",
    )
    parser.add_argument("--work-dir", default=None, help="parent of the temporary dir (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora and tokenizer")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.num_proc < 1 or any(s <= 0 for s in args.sizes_mb):
        parser.error("--num-proc and --sizes-mb must be positive")
    os.environ.update(THREAD_ENV)  # this process and every process it starts
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llm-bench-data-", dir=args.work_dir))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")  # the tokenizer's training reads through datasets
    report, tokenizer = {"sizes": {}}, None
    try:
        for size in args.sizes_mb:
            corpus = generate_corpus(work / f"corpus_{size:g}mb.txt", size)
            tokenizer = tokenizer or the_tokenizer(args.tokenizer, corpus, work)  # one for every size
            report["sizes"][f"{size:g}MB"] = result = measure(corpus, tokenizer, work, args.num_proc)
            print(json.dumps({f"{size:g}MB": result}), flush=True)
            if not args.keep:
                corpus.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    sizes = list(report["sizes"].values())
    if len(sizes) > 1:
        report["peak_rss_ratio"] = round(sizes[-1]["prepare"]["peak_rss_mb"] / sizes[0]["prepare"]["peak_rss_mb"], 3)
        print(json.dumps({"peak_rss_ratio": report["peak_rss_ratio"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
