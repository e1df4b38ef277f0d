"""Memory benchmark: peak RSS and step time of SFT with full fine-tuning (AdamW on every weight) against LoRA, each
measured in a fresh process of its own (the peak resident set the kernel reports for it, `ru_maxrss`: weights,
gradients, optimizer state, activations, and the interpreter and torch themselves).

    python -m llm.bench.memory                                   # Llama-3.2-1B shape, seq 512, batch 1, CPU
    python -m llm.bench.memory --layers 1 2 4 16 --rank 16 --json bench_memory.json

The model is Llama-3.2-1B-shaped with random weights (16 layers, d_model 2048, 32 heads, 8 kv heads, ffn 8192,
vocabulary 128256, tied embeddings); one SFT step is forward, loss on the second half of the tokens (the first half
is the prompt), backward and a fused AdamW step, as the trainer does. A measurement whose estimated need exceeds
the memory available now (`MemAvailable` less `--reserve-gib`) is not started; a started one runs under an address
space limit of that size and a watchdog that kills it if available memory falls under half the reserve, so the
benchmark never takes the machine down. Layer counts that fit are fitted to `peak = a + b * layers`
(least squares) and the fit is evaluated at the full depth, labelled as extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

from llm.model import build_gpt
from llm.peft import LoRAConfig, apply_lora, trainable_report
from llm.train.optim import OptimizerConfig

LLAMA_3_2_1B = dict(
    vocab_size=128256,
    n_layer=16,
    d_model=2048,
    n_head=32,
    n_kv_head=8,
    ffn_hidden=8192,
    max_seq_len=512,
    tie_embeddings=True,
    rope_theta=500000.0,
    pad_vocab_to=64,
)
GIB = 2**30


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def params_of(layers: int) -> int:
    c = LLAMA_3_2_1B
    head = c["d_model"] // c["n_head"]
    attn = c["d_model"] * (c["n_head"] + 2 * c["n_kv_head"]) * head + c["d_model"] ** 2
    norms = (2 * layers + 1) * c["d_model"]
    return c["vocab_size"] * c["d_model"] + layers * (attn + 3 * c["d_model"] * c["ffn_hidden"]) + norms


def estimate_bytes(mode: str, layers: int, seq_len: int) -> int:
    """A guess of the peak, to decide whether a measurement may start: fp32 weights (+ gradients and two AdamW
    moments for full fine-tuning), ~24 activations of [T, D] per layer, 1.5 GiB for the rest (calibrated on full
    fine-tuning at 1, 2 and 4 layers, seq 512: 5.30 GiB + 1.00 GiB a layer; this guess is 0.1 GiB above those and
    0.5 GiB above the 20.95 GiB measured at 16 layers)."""
    n, acts = params_of(layers), 24 * layers * seq_len * LLAMA_3_2_1B["d_model"] * 4
    return n * (16 if mode == "full" else 4) + acts + int(1.5 * GIB)


def child(mode: str, layers: int, seq_len: int, batch_size: int, rank: int, steps: int, warmup: int) -> dict:
    """One measurement, in this (fresh) process."""
    torch.manual_seed(0)
    model = build_gpt(**{**LLAMA_3_2_1B, "n_layer": layers, "max_seq_len": seq_len})
    if mode == "lora":
        apply_lora(model, LoRAConfig(rank=rank, alpha=2 * rank))
    report = trainable_report(model)
    optimizer = OptimizerConfig(lr=1e-5).build(model, "cpu")
    ids = torch.randint(0, LLAMA_3_2_1B["vocab_size"], (batch_size, seq_len))
    labels = ids.roll(-1, dims=1)
    labels[:, : seq_len // 2] = -100  # the prompt: no loss
    labels[:, -1] = -100
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model(ids, labels=labels) / (labels != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "layers": layers,
        **report,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "rank": rank if mode == "lora" else None,
        "step_s": statistics.median(times),
        "step_times_s": times,
        "rss_after_build_gib": built_rss / GIB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


def measure(mode: str, layers: int, args) -> dict:
    """`child` in a fresh process under an address-space limit and a watchdog; the result, or why there is none."""
    available = mem_available()
    limit = available - int(args.reserve_gib * GIB)
    need = estimate_bytes(mode, layers, args.seq_len)
    base = {
        "mode": mode,
        "layers": layers,
        "estimated_gib": round(need / GIB, 2),
        "available_gib_before": round(available / GIB, 2),
    }
    if need > limit:
        return {**base, "skipped": f"needs ~{need / GIB:.1f} GiB, {limit / GIB:.1f} GiB may be used now"}
    cmd = [
        sys.executable,
        "-m",
        "llm.bench.memory",
        "--child",
        mode,
        "--layers",
        str(layers),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--rank",
        str(args.rank),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]

    def cap():  # the address space the measurement may take: what is available now, less the reserve
        resource.setrlimit(resource.RLIMIT_AS, (limit + 4 * GIB, limit + 4 * GIB))  # + virtual reservations

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=cap)
    killed = []

    def watchdog():
        while proc.poll() is None:
            if mem_available() < args.reserve_gib * GIB / 2:
                killed.append(f"available memory fell under {args.reserve_gib / 2:.1f} GiB")
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.05)

    threading.Thread(target=watchdog, daemon=True).start()
    out, err = proc.communicate()
    if proc.returncode != 0:
        why = killed[0] if killed else (err.strip().splitlines() or ["?"])[-1]
        return {**base, "failed": f"exit {proc.returncode}: {why}"}
    return {**base, **json.loads(out.strip().splitlines()[-1])}


def fit(points: list[tuple[int, float]], at: int) -> float | None:
    """Least-squares line through (layers, GiB) points, evaluated at `at` layers (None under two points)."""
    if len({x for x, _ in points}) < 2:
        return None
    mx, my = statistics.mean(x for x, _ in points), statistics.mean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my + slope * (at - mx)


def summarize(rows: list[dict], depth: int) -> dict:
    peaks = {
        m: {r["layers"]: r["peak_rss_gib"] for r in rows if r["mode"] == m and "peak_rss_gib" in r}
        for m in ("full", "lora")
    }
    out = {}
    for mode, by_layers in peaks.items():
        measured = by_layers.get(depth)
        out[f"{mode}_peak_gib"] = measured if measured is not None else fit(sorted(by_layers.items()), depth)
        out[f"{mode}_peak_is"] = "measured" if measured is not None else "extrapolated"
    if out["full_peak_gib"] and out["lora_peak_gib"]:
        out["lora_over_full"] = out["lora_peak_gib"] / out["full_peak_gib"]
    common = sorted(set(peaks["full"]) & set(peaks["lora"]))
    out["ratio_by_layers"] = {n: peaks["lora"][n] / peaks["full"][n] for n in common}
    steps = {(r["mode"], r["layers"]): r["step_s"] for r in rows if "step_s" in r}
    out["step_s_lora_over_full_by_layers"] = {n: steps[("lora", n)] / steps[("full", n)] for n in common}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm.bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 16], help="depths to measure (16: the real one)")
    p.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank, every linear layer)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reserve-gib", type=float, default=3.0, help="memory left to the rest of the machine")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        result = child(args.child, args.layers[0], args.seq_len, args.batch_size, args.rank, args.steps, args.warmup)
        print(json.dumps(result))
        return result
    depth, rows = LLAMA_3_2_1B["n_layer"], []
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"{mem_available() / GIB:.1f} GiB available; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for layers in sorted(args.layers):
        for mode in args.modes:  # one at a time, each alone in its process
            row = measure(mode, layers, args)
            rows.append(row)
            shown = (
                f"peak RSS {row['peak_rss_gib']:.2f} GiB, step {row['step_s']:.2f} s, trainable "
                f"{row['trainable_params']:,} of {row['params']:,}"
                if "peak_rss_gib" in row
                else row.get("skipped") or row.get("failed")
            )
            print(f"{mode:4s} {layers:2d} layers: {shown}  (load {os.getloadavg()[0]:.2f})", flush=True)
    summary = summarize(rows, depth)
    print(json.dumps(summary, indent=2))
    result = {"rows": rows, "summary": summary, "loadavg_end": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
