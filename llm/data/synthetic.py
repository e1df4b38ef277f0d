"""Built-in instruction tasks with checkable answers, generated from a seed (no download).

Tasks: `reverse` (reverse a list of words), `sort` (sort words alphabetically), `rotate` (move the first word to the
end), `count` (how often a word occurs in a list), `add` (add two numbers). Every answer depends on the prompt: no
constant answer scores above 0.2 exact match (tested). Each example also carries a plausible wrong answer
(`rejected`) for preference data.

Prompts are split into train and held-out by a hash of the prompt text, so a held-out prompt never appears in
training data, whatever the number of examples drawn.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

from llm.errors import ConfigError

# Short words that are frequent in Python sources, so the default BPE has most of them as single tokens.
WORDS = (
    "self",
    "list",
    "data",
    "name",
    "file",
    "type",
    "value",
    "key",
    "path",
    "line",
    "time",
    "size",
    "mode",
    "text",
    "node",
    "item",
    "code",
    "base",
    "user",
    "args",
    "next",
    "last",
    "left",
    "right",
    "true",
    "false",
    "read",
    "open",
    "close",
    "load",
    "sort",
    "find",
    "string",
    "index",
    "count",
    "error",
    "result",
    "start",
    "end",
    "new",
)


def _words(rng: random.Random, n: int) -> list[str]:
    return rng.sample(WORDS, n)


def _reverse(rng, lo=3, hi=5):
    w = _words(rng, rng.randint(lo, hi))
    wrong = w[:]
    i = rng.randrange(len(w) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]  # one adjacent swap away from the input order
    return f"reverse: {' '.join(w)}", " ".join(reversed(w)), " ".join(reversed(wrong))


def _sort(rng, lo=3, hi=5):
    w = _words(rng, rng.randint(lo, hi))
    answer = sorted(w)
    wrong = answer[:]
    i = rng.randrange(len(w) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    return f"sort: {' '.join(w)}", " ".join(answer), " ".join(wrong)


def _rotate(rng, lo=3, hi=5):
    w = _words(rng, rng.randint(lo, hi))
    return f"rotate: {' '.join(w)}", " ".join(w[1:] + w[:1]), " ".join(w[-1:] + w[:-1])  # wrong: the other way


def _add(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    wrong = a + b + rng.choice((-10, -1, 1, 10))
    return f"add: {a} + {b}", str(a + b), str(wrong if wrong >= 0 else a + b + 1)


def _count(rng):
    target = rng.choice(WORDS)
    k = rng.randint(1, 6)
    others = [x for x in WORDS if x != target]
    items = [target] * k + rng.sample(others, rng.randint(1, 7 - k) if k < 7 else 0)
    rng.shuffle(items)
    wrong = k + rng.choice((-1, 1)) if k > 1 else k + 1
    return f"count {target}: {' '.join(items)}", str(k), str(wrong)


TASKS = {"reverse": _reverse, "sort": _sort, "rotate": _rotate, "count": _count, "add": _add}
LIST_TASKS = ("reverse", "sort", "rotate")  # the tasks whose list length `list_length` sets


def is_heldout(prompt: str, heldout_fraction: float, seed: int) -> bool:
    return zlib.crc32(f"{seed}|{prompt}".encode()) % 10_000 < heldout_fraction * 10_000


class VerifiableTasks:
    """Rows {prompt, response, answer, chosen, rejected, task} of the built-in tasks, for one split.

    split: train | heldout. The same seed gives the same rows; train and held-out never share a prompt.
    offset: skip the first `offset` prompts of the sequence, e.g. the ones an SFT run trained on, so that a DPO
    run with offset = SFT's num_examples sees only prompts new to the model.
    list_length: [min, max] words per list of reverse, sort and rotate (both included; at most the 40 words).
    """

    def __init__(
        self,
        split: str = "train",
        tasks=("reverse", "sort", "rotate"),
        num_examples: int = 4000,
        heldout_fraction: float = 0.1,
        seed: int = 0,
        offset: int = 0,
        list_length=(3, 5),
    ):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"data tasks {unknown} are not built in; choose from {sorted(TASKS)}")
        if split not in ("train", "heldout"):
            raise ConfigError(f"split={split!r} is not allowed; choose one of ['heldout', 'train']")
        if not isinstance(num_examples, int) or num_examples < 1:
            raise ConfigError(f"num_examples={num_examples!r} must be a positive integer")
        if not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"offset={offset!r} must be a non-negative integer")
        lengths = list(list_length) if isinstance(list_length, Sequence) and not isinstance(list_length, str) else None
        if (
            not lengths
            or len(lengths) != 2
            or not all(isinstance(n, int) for n in lengths)
            or not (2 <= lengths[0] <= lengths[1] <= len(WORDS))
        ):
            raise ConfigError(
                f"list_length={list_length!r} must be [min, max] words with 2 <= min <= max <= {len(WORDS)}"
            )
        self.split, self.tasks, self.num_examples, self.offset = split, list(tasks), num_examples, offset
        self.list_length = tuple(lengths)
        self.heldout_fraction, self.seed = heldout_fraction, seed

    def rows(self):
        """Yield (where, row) for `num_examples` distinct prompts of this split (after the first `offset`), tasks
        in round robin."""
        rng = random.Random(self.seed)
        seen: set[str] = set()
        want_heldout = self.split == "heldout"
        attempts, total = 0, self.offset + self.num_examples
        while len(seen) < total:
            attempts += 1
            if attempts > 200 * total:
                raise ConfigError(
                    f"built-in tasks {self.tasks}: cannot draw {self.num_examples} distinct "
                    f"{self.split} prompts; ask for fewer"
                )
            task = self.tasks[attempts % len(self.tasks)]
            make = TASKS[task]
            prompt, answer, wrong = make(rng, *self.list_length) if task in LIST_TASKS else make(rng)
            if prompt in seen or is_heldout(prompt, self.heldout_fraction, self.seed) != want_heldout:
                continue
            seen.add(prompt)
            if len(seen) <= self.offset:
                continue
            yield (
                f"built-in {self.split} #{len(seen)}",
                {
                    "prompt": prompt,
                    "response": answer,
                    "answer": answer,  # task=grpo's reward target
                    "chosen": answer,
                    "rejected": wrong,
                    "task": task,
                },
            )

    def describe(self) -> str:
        skip = f", after the first {self.offset}" if self.offset else ""
        lists = "" if self.list_length == (3, 5) else f", lists of {self.list_length[0]}-{self.list_length[1]} words"
        return (
            f"built-in tasks {self.tasks} ({self.split}, {self.num_examples} examples{skip}{lists}, seed {self.seed})"
        )
