"""Generation throughput benchmark: our batched KV-cache sampler (the one task=grpo uses) against Hugging Face
`generate` on the same model, in the same process, as new tokens per second and the ratio ours / HF.

    python -m llm.bench.generate                                  # tiny preset, 16 prompts x 8 samples, CPU
    python -m llm.bench.generate --prompts 16 --samples 8 --new-tokens 32 --repeats 3 --json gen.json
    python -m llm.bench.generate --model 125m --device cuda --dtype bfloat16

The HF model is ours exported with llm/hf (config.json and tensors of `LlamaForCausalLM`, or `GPT2LMHeadModel`
for a GPT-2-shaped preset), so both sides compute the same function: greedy outputs are checked to be equal token
for token first. The workload is GRPO's: `--prompts` prompts of different lengths (`--prompt-len`, +-50%),
left-padded into one batch with an attention mask, `--samples` completions each (ours: `num_samples`, each prompt
read once and its KV cache shared by its samples; HF: `num_return_sequences`, which repeats the prompts before
reading them), sampled at temperature 1 for exactly `--new-tokens` new tokens (no stop token on either side, so
both generate the same number). Repeats are
interleaved (ours, HF, ours, ...) after one warm-up each; the median per side is reported. Run by hand, never in
the suite.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from llm.eval.sampling import left_pad
from llm.hf.convert import config_to_hf, to_hf
from llm.model import build_gpt

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "model"


def build_models(preset: str, vocab_size: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Our GPT of a preset (random weights, fixed seed) and the transformers model holding the same tensors."""
    import transformers
    import yaml

    transformers.logging.set_verbosity_error()
    cfg = (
        yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())
        if not preset.endswith(".yaml")
        else (yaml.safe_load(Path(preset).read_text()))
    )
    cfg = {k: v for k, v in cfg.items() if k != "_target_"}
    torch.manual_seed(seed)
    ours = build_gpt(**{**cfg, "vocab_size": vocab_size, "dropout": 0.0}).to(device, dtype).eval()
    hf_config = config_to_hf(ours.config, str(dtype).removeprefix("torch."), {"pad_token_id": 0})
    hf_config = transformers.AutoConfig.for_model(**hf_config)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).to(device, dtype).eval()
    missing, unexpected = hf.load_state_dict(to_hf(ours), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):  # the tied head is the embedding
        raise SystemExit(f"HF model does not take our tensors: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return ours, hf


def workload(n_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(1, vocab_size) for _ in range(rng.randint(prompt_len // 2, prompt_len * 3 // 2))]
        for _ in range(n_prompts)
    ]
    return prompts


def _ours(model, ids, mask, new_tokens, temperature, generator, samples=1):
    return model.generate(ids, new_tokens, temperature, generator=generator, attention_mask=mask, num_samples=samples)


def _hf(model, ids, mask, new_tokens, temperature, generator, samples=1):
    sample = temperature > 0
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        num_return_sequences=samples,
        pad_token_id=0,
        eos_token_id=None,
        use_cache=True,
    )


@torch.no_grad()
def run(args) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    ours, hf = build_models(args.model, args.vocab_size, device, dtype)
    prompts = workload(args.prompts, args.prompt_len, args.vocab_size)
    ids, mask = left_pad(prompts, 0, device)
    check_ids, check_mask = left_pad(prompts[:4], 0, device)
    same = torch.equal(_ours(ours, check_ids, check_mask, 8, 0.0, None), _hf(hf, check_ids, check_mask, 8, 0.0, None))
    times, rows = {"ours": [], "hf": []}, len(prompts) * args.samples
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for repeat in range(args.repeats + 1):  # the first round warms up both
        for name, fn, model in (("ours", _ours, ours), ("hf", _hf, hf)):
            gen = torch.Generator(device=device).manual_seed(repeat)
            torch.manual_seed(repeat)
            sync()
            start = time.perf_counter()
            out = fn(model, ids, mask, args.new_tokens, 1.0, gen, args.samples)
            sync()
            if repeat:
                times[name].append(time.perf_counter() - start)
            assert out.shape == (rows, ids.size(1) + args.new_tokens), (name, out.shape)
    new = rows * args.new_tokens
    result = {
        "model": args.model,
        "device": device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "samples": args.samples,
        "rows": rows,
        "prompt_tokens_max": ids.size(1),
        "new_tokens": args.new_tokens,
        "greedy_equal": same,
        **{f"{k}_tokens_per_s": new / statistics.median(v) for k, v in times.items()},
        **{f"{k}_seconds": [round(t, 4) for t in v] for k, v in times.items()},
    }
    result["ratio_ours_over_hf"] = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a preset of conf/model/ or a model yaml")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt (GRPO's group size)")
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    result = run(parser.parse_args(argv))
    print(json.dumps(result, indent=2))
    if parser.parse_args(argv).json:
        Path(parser.parse_args(argv).json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
