"""Training throughput benchmark: our GPT against the Hugging Face `transformers` model of identical dimensions
(Llama for RoPE/RMSNorm/SwiGLU, GPT-2 for learned positions/LayerNorm/GELU), measured in the same process on the
same batch, reported as tokens/s, step time, peak memory, MFU (CUDA) and the ratio ours / HF.

    python -m llm.bench                                   # tiny preset on CPU, ours vs HF Llama
    python -m llm.bench --model tiny --arch gpt2 --repeats 3
    python -m llm.bench --model 125m --batch-size 16 --seq-len 1024 --device cuda --compile
    python -m llm.bench --model conf/model/1b.yaml --only ours --json bench.json
    python -m llm.bench --sft-vs-dpo --seq-len 64 --batch-size 32     # DPO step time over SFT step time
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from llm.bench.models import build_hf, model_kwargs
from llm.bench.rss import PeakRSS, free_memory
from llm.model import GPTConfig, build_gpt, flops_per_token
from llm.train.objectives import DPO, LanguageModeling, cross_entropy


def measure(side: str, args, kwargs: dict, arch: str, window: torch.Tensor, device: torch.device) -> dict:
    """Build one side fresh (seed 0), run warmup + timed training steps; tok/s, step ms, peak memory, params."""
    free_memory(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    meter = contextlib.nullcontext() if cuda else PeakRSS()
    base = torch.cuda.memory_allocated(device) if cuda else meter.peak
    with meter:
        torch.manual_seed(0)
        model = build_gpt(**kwargs) if side == "ours" else build_hf(arch, GPTConfig(**kwargs))
        model.to(device).train()
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=cuda)
        step_model = torch.compile(model) if args.compile else model
        objective = LanguageModeling()
        x, y = window[:, :-1], window[:, 1:]

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                if side == "ours":
                    loss, _ = objective.loss(step_model, {"input_ids": x, "labels": y})
                else:  # the same fp32 cross-entropy on the same shifted targets (not HF's internal labels= loss)
                    loss = cross_entropy(step_model(input_ids=x).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if cuda else meter.peak) - base
    model = step_model = opt = None  # memory is freed at the start of the next measurement
    return {
        "params": params,
        "tok_s": x.numel() * args.steps / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "peak_mib": peak / 2**20,
    }


def measure_sft_vs_dpo(args, kwargs: dict, device: torch.device, T: int) -> dict:
    """Our model's step time for SFT (B sequences of T tokens, loss on the second half) and for DPO (B pairs of T
    tokens, chosen and rejected in one forward, precomputed reference log-probs), same B and T; alternated."""
    torch.manual_seed(0)
    model = build_gpt(**kwargs).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(1)
    B, V = args.batch_size, kwargs["vocab_size"]

    def seqs():
        ids = torch.randint(0, V, (B, T + 1), generator=gen)
        labels = ids[:, 1:].clone()
        labels[:, : T // 2] = -100  # prompt half: no loss
        return ids[:, :-1].to(device), labels.to(device)

    x, y = seqs()
    (cx, cy), (rx, ry) = seqs(), seqs()
    batches = {
        "sft": (LanguageModeling(), {"input_ids": x, "labels": y}),
        "dpo": (
            DPO(),
            {
                "chosen_input_ids": cx,
                "chosen_labels": cy,
                "rejected_input_ids": rx,
                "rejected_labels": ry,
                "ref_chosen_logp": torch.full((B,), -50.0, device=device),
                "ref_rejected_logp": torch.full((B,), -50.0, device=device),
            },
        ),
    }
    times = {"sft": [], "dpo": []}
    for i in range(args.warmup + args.steps * args.repeats):
        for name, (objective, batch) in batches.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss, _ = objective.loss(step_model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    sft_ms, dpo_ms = (1000 * statistics.median(times[k]) for k in ("sft", "dpo"))
    return {"sft_step_ms": sft_ms, "dpo_step_ms": dpo_ms, "dpo_over_sft": dpo_ms / sft_ms}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m llm.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny", help="preset name in conf/model or a path to a model yaml")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: min(256, the preset's max_seq_len)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokenizer size to assume (default: the preset's, else 4096 for tiny and 50304 otherwise)",
    )
    p.add_argument(
        "--arch",
        choices=["auto", "llama", "gpt2"],
        default="auto",
        help="HF counterpart; our model's architecture fields are set to match it",
    )
    p.add_argument("--only", choices=["ours", "hf", "both"], default="both")
    p.add_argument("--repeats", type=int, default=1, help="alternate ours/HF this many times; report medians")
    p.add_argument("--peak-flops", type=float, default=989e12, help="for MFU (default: H100 dense bf16)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--sft-vs-dpo",
        action="store_true",
        help="instead of the HF comparison: our SFT step time vs our DPO step time at equal B and T",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import transformers

    args = parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    args.bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")  # autocast, both sides
    kwargs, arch = model_kwargs(args)
    T = args.seq_len or min(256, kwargs.get("max_seq_len", 256))
    if T > kwargs.get("max_seq_len", 256):
        raise SystemExit(f"--seq-len {T} exceeds the preset's max_seq_len {kwargs.get('max_seq_len', 256)}")
    if args.sft_vs_dpo:
        res = {
            "device": device_name(device),
            "model": args.model,
            "batch_size": args.batch_size,
            "seq_len": T,
            **measure_sft_vs_dpo(args, kwargs, device, T),
        }
        print(f"device: {res['device']} | model {args.model}, B{args.batch_size} x T{T} (DPO: B pairs)")
        print(
            f"SFT step {res['sft_step_ms']:.1f} ms | DPO step {res['dpo_step_ms']:.1f} ms | "
            f"ratio DPO/SFT: {res['dpo_over_sft']:.2f}x"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        return res
    gen = torch.Generator().manual_seed(0)
    window = torch.randint(0, kwargs["vocab_size"], (args.batch_size, T + 1), generator=gen).to(device)
    sides = ["ours", "hf"] if args.only == "both" else [args.only]

    # One untimed step per side first: the first run in a process pays one-time costs (lazy imports, thread
    # pools, allocator and kernel caches) that would otherwise be charged to whichever side happens to go first.
    prime = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0})
    for side in sides:
        measure(side, prime, kwargs, arch, window, device)
    runs = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            runs[side].append(measure(side, args, kwargs, arch, window, device))
    c = GPTConfig(**kwargs)  # resolved: ffn_hidden, padded_vocab_size
    results = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "arch": arch,
        "batch_size": args.batch_size,
        "seq_len": T,
        "vocab_size": c.vocab_size,
        "padded_vocab_size": c.padded_vocab_size,
        "dtype": "bf16" if args.bf16 else "fp32",
        "compile": args.compile,
        "steps": args.steps,
        "repeats": args.repeats,
        "memory": "peak allocated (CUDA)" if device.type == "cuda" else "peak RSS increase (approx.)",
    }
    for side, measured in runs.items():
        r = {k: statistics.median(m[k] for m in measured) for k in ("tok_s", "step_ms", "peak_mib")}
        r.update(params=measured[0]["params"], tok_s_all=[m["tok_s"] for m in measured])
        if device.type == "cuda":
            r["mfu"] = r["tok_s"] * flops_per_token(c, measured[0]["params"], T) / args.peak_flops
        results[side] = r
    if args.only == "both":
        if results["ours"]["params"] != results["hf"]["params"]:
            print(
                f"WARNING: parameter counts differ: ours {results['ours']['params']:,} "
                f"vs hf {results['hf']['params']:,}"
            )
        results["ratio_tok_s"] = results["ours"]["tok_s"] / results["hf"]["tok_s"]
        results["ratio_mem"] = results["ours"]["peak_mib"] / max(results["hf"]["peak_mib"], 1e-9)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def report(res: dict) -> None:
    print(
        f"device: {res['device']} | torch {res['torch']} | transformers {res['transformers']} | "
        f"threads {res['threads']}"
    )
    print(
        f"model {res['model']} (arch {res['arch']}), B{res['batch_size']} x T{res['seq_len']}, vocab "
        f"{res['vocab_size']} (padded {res['padded_vocab_size']}), {res['dtype']}, compile={res['compile']}, "
        f"{res['steps']} steps x {res['repeats']} repeat(s), medians"
    )
    if "hf" in res:
        print("HF loss: fp32 cross-entropy on HF logits against the same shifted targets as ours (not labels=)")
    cuda = "mfu" in res.get("ours", res.get("hf", {}))
    header = f"{'name':<6}{'params':>14}{'tok/s':>12}{'step ms':>10}{'peak MiB':>10}" + (f"{'MFU':>8}" if cuda else "")
    print(header + f"   memory: {res['memory']}")
    for side in ("ours", "hf"):
        if side in res:
            r = res[side]
            line = f"{side:<6}{r['params']:>14,}{r['tok_s']:>12,.0f}{r['step_ms']:>10.1f}{r['peak_mib']:>10.1f}"
            print(line + (f"{r['mfu']:>8.1%}" if cuda else ""))
    if "ratio_tok_s" in res:
        print(f"ratio ours/hf tok/s: {res['ratio_tok_s']:.2f}x | peak memory: {res['ratio_mem']:.2f}x")


if __name__ == "__main__":
    main()
