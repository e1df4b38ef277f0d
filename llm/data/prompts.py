"""Prompts with checkable answers, for reinforcement learning (task=grpo): rows -> chat-formatted prompt tokens.

A row holds a prompt (a string, the user's turn, or a list of messages ending with a user turn) and an answer
(any JSON value; the rewards compare against it); the field names are task.data.prompt_field / answer_field.
`train` items are prompts to sample completions for; `val` and `eval_rows` are held-out prompts for evaluation.
A batch is {prompt_ids: [lists of token ids], rows: [the rows, each with `answer`], where: [file:line or #n],
index: [dataset indices]}: the objective turns it into token tensors once it has sampled the completions.
"""

from __future__ import annotations

import json
import zlib

import torch
from loguru import logger

from llm.contract import Data
from llm.data.chat import check_message, encode_chat, ensure_chat_template, require_text
from llm.errors import ConfigError, DataError


class PromptRows(torch.utils.data.Dataset):
    """Encoded prompts and their rows; `collate` keeps them as lists (lengths differ until the completions exist)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], "index": i}

    def collate(self, items: list[dict]) -> dict:
        return {key: [x[key] for x in items] for key in ("prompt_ids", "prompt", "rows", "where", "index")}


class PromptData(Data):
    """Prompt/answer rows from a source (post_data.train; post_data.val or a held-out share of the train rows)."""

    def __init__(
        self,
        tokenizer,
        source,
        val_source=None,
        val_fraction: float = 0.05,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        system_field: str | None = None,
        max_prompt_tokens: int | None = None,
        eval_samples: int = 200,
        seed: int = 0,
    ):
        if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
            raise ConfigError(f"task.data.max_prompt_tokens={max_prompt_tokens!r} must be a positive integer or null")
        self.tokenizer, self.source, self.val_source, self.val_fraction = tokenizer, source, val_source, val_fraction
        self.prompt_field, self.answer_field, self.system_field = prompt_field, answer_field, system_field
        self.max_prompt_tokens, self.eval_samples, self.seed = max_prompt_tokens, eval_samples, seed
        self.train = self.val = None
        self.eval_rows: list[dict] = []
        ensure_chat_template(tokenizer)  # now, so the model is built with any chat tokens this adds

    def _messages(self, row: dict, where: str) -> list[dict]:
        value = row.get(self.prompt_field)
        if isinstance(value, list):
            messages = [check_message(m, where, i) for i, m in enumerate(value)]
            if not messages or messages[-1]["role"] != "user":
                raise DataError(f"{where}: field {self.prompt_field!r} must end with a user message")
        else:
            messages = [{"role": "user", "content": require_text(row, self.prompt_field, where)}]
        if self.system_field and row.get(self.system_field):
            messages.insert(0, {"role": "system", "content": require_text(row, self.system_field, where)})
        return messages

    def _item(self, row: dict, where: str) -> dict | None:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
        if row.get(self.answer_field) is None:
            raise DataError(
                f"{where}: missing field {self.answer_field!r} (the answer rewards compare against; "
                f"task.data.answer_field names it)"
            )
        messages = self._messages(row, where)
        ids, _ = encode_chat(self.tokenizer, messages, add_generation_prompt=True)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            return None
        return {
            "prompt_ids": ids,
            "prompt": messages[-1]["content"],
            "rows": {**row, "answer": row[self.answer_field]},
            "where": where,
        }

    def _split(self) -> tuple[list, list]:
        train = list(self.source.rows())
        if self.val_source is not None:
            return train, list(self.val_source.rows())
        is_val = [
            zlib.crc32(f"{self.seed}|{json.dumps(r.get(self.prompt_field), sort_keys=True)}".encode()) % 10_000
            < self.val_fraction * 10_000
            for _, r in train
        ]
        return [x for x, v in zip(train, is_val) if not v], [x for x, v in zip(train, is_val) if v]

    def prepare(self) -> PromptData:
        splits = {}
        for split, rows in zip(("train", "val"), self._split()):
            items = [self._item(row, where) for where, row in rows]
            kept = [x for x in items if x is not None]
            if not kept:
                what = (
                    f"{self.source.describe()} gave no usable training prompt"
                    if split == "train"
                    else ("no held-out prompt (set post_data.val or raise task.data.val_fraction)")
                )
                raise DataError(
                    f"data: {what}"
                    + (
                        f" ({len(items)} rows longer than task.data.max_prompt_tokens={self.max_prompt_tokens})"
                        if items
                        else ""
                    )
                )
            logger.info(
                f"data: {split}: {len(items)} prompts, {len(items) - len(kept)} longer than "
                f"max_prompt_tokens dropped, {len(kept)} kept"
            )
            splits[split] = kept
        self.train, self.val = PromptRows(splits["train"]), PromptRows(splits["val"])
        self.eval_rows = splits["val"][: self.eval_samples]
        return self
