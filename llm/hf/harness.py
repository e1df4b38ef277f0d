"""EleutherAI's lm-evaluation-harness (`lm-eval`, the optional `eval` extra) on a Hugging Face model dir, with an
offline task set made from our own held-out rows.

Our tasks, written as lm-eval task files (YAML + JSONL) into the run dir so a result can be inspected and re-run:
- `llm_builtin_gen` (generate_until): a greedy reply to each held-out prompt, scored by exact match after trimming
  whitespace on both sides, as `llm.eval.exact_match` scores it;
- `llm_builtin_mc` (multiple_choice): the reference answer against the row's plausible wrong one (`rejected`),
  scored by the log-likelihood of each complete reply (`acc`; `acc_norm` divides it by the reply's characters).

Prompts are stored already rendered by the model's own chat template, and lm-eval is told to add no BOS, so lm-eval
feeds the model exactly the token ids `exact_match` feeds it (checked for every row when the files are written);
its `apply_chat_template` would render the same text but decides on BOS tokens by its own rules. Any other name is
one of lm-eval's tasks (most download their data from the hub). lm-eval is imported only when it is used: it takes
seconds to import, and a run without the extra must still compose.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import zlib
from importlib.metadata import version
from pathlib import Path

import torch

from llm.data.chat import encode_chat, to_messages
from llm.errors import ConfigError, DataError, check_int

GEN, MC = "llm_builtin_gen", "llm_builtin_mc"
OUR_TASKS = (GEN, MC)
EXTRA = "pip install -e .[eval]"
DATASETS_CACHE = "datasets_cache"  # in the task dir, while lm-eval runs


def require_lm_eval() -> str:
    """lm-eval's version; a ConfigError naming the extra when it (or the `accelerate` its HF model class needs) is
    not installed. Raised before any work."""
    for module in ("lm_eval", "accelerate"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"task=lm_eval needs the optional lm-eval extra: {EXTRA} ({e})") from None
    return version("lm_eval")


def check_task_names(names) -> list[str]:
    """The task names as a list; our own names are checked here, any other is left to lm-eval's index."""
    if isinstance(names, str):
        names = [names]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"task.tasks={names!r} must be a non-empty list of lm-eval task names, e.g. [{GEN},{MC}]")
    unknown = [n for n in names if n.startswith("llm_") and n not in OUR_TASKS]
    if unknown:
        raise ConfigError(f"task.tasks: {unknown[0]!r} is not one of ours ({', '.join(OUR_TASKS)})")
    return list(names)


def check_settings(names: list[str], limit, num_fewshot, batch_size, max_new_tokens, device: str) -> str:
    """The counts of task=lm_eval checked before any work; returns the torch device to evaluate on."""
    check_int("task.limit", limit, 1, allow_none=True)
    check_int("task.num_fewshot", num_fewshot, 0, allow_none=True)
    check_int("task.max_new_tokens", max_new_tokens, 1)
    if batch_size != "auto":
        check_int("task.batch_size", batch_size, 1)
    if num_fewshot and any(n in OUR_TASKS for n in names):
        raise ConfigError(
            f"task.num_fewshot={num_fewshot}: {', '.join(OUR_TASKS)} are zero-shot chat prompts; "
            f"set it to null or 0 (or evaluate lm-eval's tasks in a run of their own)"
        )
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not device.startswith(("cpu", "cuda")):
        raise ConfigError(f"task.device={device!r} is not allowed; choose auto, cpu, cuda or cuda:N")
    return device


def task_manager(names: list[str]):
    """lm-eval's TaskManager, indexing lm-eval's own tasks only when a name asks for one (its ~14k YAML files take
    seconds); an unknown name, or one of its tasks whose data cannot be had, is a one-line ConfigError. Ours are
    given to lm-eval as the paths of their files (see `task_specs`)."""
    from lm_eval.tasks import TaskManager  # lazy: lm-eval is optional and slow to import

    theirs = [n for n in names if n not in OUR_TASKS]
    manager = TaskManager(include_defaults=bool(theirs))
    unknown = [n for n in theirs if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"task.tasks: {unknown[0]!r} is not an lm-eval task; ours are {', '.join(OUR_TASKS)}, and "
            f"`lm_eval --tasks list` lists lm-eval's own"
        )
    if theirs:
        try:  # their data now (from the hub or its cache), so a task that cannot load fails before any work
            manager.load(theirs)
        except OSError as e:  # datasets' offline and not-found errors, connection errors
            raise ConfigError(
                f"task.tasks: the data of lm-eval's {', '.join(theirs)} does not load (most come from "
                f"the Hugging Face hub): {type(e).__name__}: {str(e).splitlines()[0]}"
            ) from None
    return manager


def task_specs(names: list[str], task_dir: Path) -> list[str]:
    """What lm-eval is asked to run: the path of our task files, the names of its own tasks."""
    return [str(task_dir / f"{n}.yaml") if n in OUR_TASKS else n for n in names]


def held_out_examples(rows, tokenizer, model: str) -> list[dict]:
    """(where, row) pairs -> {messages, prompt (rendered), answer, rejected, task} as `exact_match` sees them: the
    messages before the last assistant turn, and that turn's content as the answer. `model` names the model dir."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{model}: its tokenizer has no chat template, and {GEN} / {MC} are chat prompts")
    examples = []
    for where, row in rows:
        messages = to_messages(row, where)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt, answer = messages[:last], messages[last]["content"]
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = encode_chat(tokenizer, prompt, add_generation_prompt=True)[0]
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:  # lm-eval must see what exact_match sees
            raise DataError(f"{where}: the chat template's text does not tokenize to the prompt's token ids")
        rejected = row.get("rejected") if isinstance(row.get("rejected"), str) else None
        examples.append(
            {
                "where": where,
                "messages": prompt,
                "prompt": text,
                "answer": answer,
                "rejected": rejected,
                "task": row.get("task"),
            }
        )
    return examples


def _reply_text(tokenizer, prompt: list[dict], prompt_text: str, reply: str) -> str:
    """A complete assistant reply as the template writes it after the rendered prompt (with its end token)."""
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError("the chat template does not render a reply as a continuation of its prompt")
    return full[len(prompt_text) :]


def write_tasks(task_dir: Path, examples: list[dict], tokenizer, names: list[str], max_new_tokens: int) -> dict:
    """Our tasks among `names` as lm-eval task files in `task_dir` (`<task>.yaml` + `<task>.jsonl`); returns
    {task: number of examples}."""
    task_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if GEN in names:
        docs = [{"prompt": e["prompt"], "answer": e["answer"], "task": e["task"]} for e in examples]
        config = {
            "output_type": "generate_until",
            "doc_to_target": "answer",
            # greedy, at most max_new_tokens; the model's generation config stops at the template's end token
            "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
            # whitespace trimmed on both sides, as llm.eval.exact_match compares
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "regexes_to_ignore": [r"^\s+", r"\s+$"],
                }
            ],
        }
        written[GEN] = _write_task(task_dir, GEN, docs, config)
    if MC in names:
        missing = next((e["where"] for e in examples if not e["rejected"]), None)
        if missing is not None:
            raise DataError(f"{missing}: {MC} needs a 'rejected' answer in every row (the built-in tasks have one)")
        docs = []
        for e in examples:
            right, wrong = (_reply_text(tokenizer, e["messages"], e["prompt"], r) for r in (e["answer"], e["rejected"]))
            gold = zlib.crc32(e["prompt"].encode()) % 2  # the right answer first or second, fixed per prompt
            docs.append(
                {
                    "prompt": e["prompt"],
                    "choices": [wrong, right] if gold else [right, wrong],
                    "gold": gold,
                    "task": e["task"],
                }
            )
        config = {
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": "",  # the reply follows the rendered prompt directly
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
        }
        written[MC] = _write_task(task_dir, MC, docs, config)
    return written


def _write_task(task_dir: Path, name: str, docs: list[dict], config: dict) -> int:
    data = task_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    # datasets' Arrow copy of the rows goes to the run dir (not ~/.cache/huggingface); llm.tasks.lm_eval removes it
    files = {"data_files": {"test": str(data)}, "cache_dir": str(task_dir / DATASETS_CACHE)}
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": files,
        "test_split": "test",
        "doc_to_text": "prompt",
        "num_fewshot": 0,
        **config,
        "metadata": {"version": 1},
    }
    (task_dir / f"{name}.yaml").write_text(json.dumps(task, indent=2) + "\n")  # JSON is YAML
    return len(docs)


def run_lm_eval(
    model_dir: Path,
    specs: list[str],
    manager,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    num_fewshot: int | None = None,
    seed: int = 1234,
) -> tuple[dict, dict]:
    """lm-eval's `simple_evaluate` of the HF model dir on `specs` (see `task_specs`): (flat scores
    `lm_eval/<task>/<metric>` (and `<metric>_stderr`), per-task samples: the doc, the model's reply or
    log-likelihoods, the per-example scores)."""
    import lm_eval  # lazy: see the module docstring

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "auto", "add_bos_token": False},
        tasks=specs,
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        device=device,
        num_fewshot=num_fewshot,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    scores = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue  # 'alias', 'samples'
            metric, filt = key.split(",", 1)
            name = f"lm_eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")
            scores[name] = None if isinstance(value, float) and math.isnan(value) else float(value)
    return scores, out.get("samples", {})


def write_samples(out_dir: Path, samples: dict) -> list[str]:
    """lm-eval's per-example records, one JSONL file per task (`<task>.jsonl`: the doc, the prompt and settings
    lm-eval sent, the model's raw and filtered replies or log-likelihoods, the example's scores)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, records in samples.items():
        lines = (json.dumps(r, default=str) + "\n" for r in sorted(records, key=lambda r: r["doc_id"]))
        (out_dir / f"{task}.jsonl").write_text("".join(lines))
    return sorted(samples)
