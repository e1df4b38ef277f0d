"""Post-training data: SFT conversations and DPO preference pairs, tokenized with the chat template.

SFT sample: input_ids, labels (the next token where it belongs to an assistant turn, else -100). With packing,
several samples share one row of `seq_len` tokens; each keeps its own positions (position_ids restart at 0) and
attends only to itself (a block-diagonal causal mask), so packed and unpacked losses are equal.
Preference sample: chosen_* and rejected_* ids/labels of prompt + response (labels only on the response).
Both keep held-out examples (prompt messages + reference answer) for exact-match evaluation by generation.
"""

from __future__ import annotations

import json
import zlib

import torch
from loguru import logger

from llm.contract import (
    ATTN_MASK,
    CHOSEN,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    POSITION_IDS,
    REJECTED,
    Data,
    ref_logp_key,
    side_key,
)
from llm.data.chat import check_message, encode_chat, ensure_chat_template, require_text, to_messages
from llm.data.documents import block_causal_mask
from llm.errors import ConfigError, DataError, check_choice


def shifted(ids: list[int], mask: list[bool]) -> dict:
    """ids of length n+1 -> input_ids (n) and labels (n): labels[t] = ids[t+1] where that token is trained."""
    return {INPUT_IDS: ids[:-1], LABELS: [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]}


def pad(seqs: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


class TokenRows(torch.utils.data.Dataset):
    """A list of tokenized samples with a padding collate. Packed rows carry doc_ids -> block-diagonal mask."""

    def __init__(self, samples: list[dict], pad_id: int):
        self.samples, self.pad_id = samples, pad_id

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        if side_key(CHOSEN, INPUT_IDS) in items[0]:  # preference pairs: one length for chosen and rejected
            length = max(len(x[side_key(side, INPUT_IDS)]) for x in items for side in (CHOSEN, REJECTED))
            for side in (CHOSEN, REJECTED):
                ids, labels = side_key(side, INPUT_IDS), side_key(side, LABELS)
                out[ids] = pad([x[ids] for x in items], self.pad_id, length)
                out[labels] = pad([x[labels] for x in items], IGNORE_INDEX, length)
                if ref_logp_key(side) in items[0]:
                    out[ref_logp_key(side)] = torch.tensor([x[ref_logp_key(side)] for x in items], dtype=torch.float32)
            return out
        out[INPUT_IDS] = pad([x[INPUT_IDS] for x in items], self.pad_id)
        out[LABELS] = pad([x[LABELS] for x in items], IGNORE_INDEX)
        if "doc_ids" in items[0]:
            out[POSITION_IDS] = pad([x[POSITION_IDS] for x in items], 0)
            doc = pad([x["doc_ids"] for x in items], -1)  # padding forms its own block
            out[ATTN_MASK] = block_causal_mask(doc)  # [B, 1, T, T]
        return out


def pack(samples: list[dict], seq_len: int) -> list[dict]:
    """Greedy packing in order: append samples to the current row until the next one does not fit."""
    rows, cur = [], None
    for s in samples:
        n = len(s[INPUT_IDS])
        if cur is None or len(cur[INPUT_IDS]) + n > seq_len:
            cur = {INPUT_IDS: [], LABELS: [], POSITION_IDS: [], "doc_ids": []}
            rows.append(cur)
        doc = cur["doc_ids"][-1] + 1 if cur["doc_ids"] else 0
        cur[INPUT_IDS] += s[INPUT_IDS]
        cur[LABELS] += s[LABELS]
        cur[POSITION_IDS] += list(range(n))
        cur["doc_ids"] += [doc] * n
    return rows


class _PostTrainData(Data):
    """Shared by SFT and preference data: rows -> train/val split -> samples, over-long handling, eval examples."""

    def __init__(
        self,
        tokenizer,
        source,
        seq_len: int,
        val_source=None,
        val_fraction: float = 0.05,
        overlong: str = "truncate",
        eval_samples: int = 200,
        seed: int = 0,
    ):
        check_choice("task.data.overlong", overlong, {"truncate", "drop"})
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ConfigError(f"trainer.seq_len={seq_len!r} must be an integer >= 2")
        self.tokenizer, self.source, self.val_source, self.seq_len = tokenizer, source, val_source, seq_len
        self.val_fraction, self.overlong, self.eval_samples, self.seed = val_fraction, overlong, eval_samples, seed
        self.train = self.val = None
        self.eval_examples: list[tuple[list[dict], str]] = []
        self.stats: dict = {}
        ensure_chat_template(tokenizer)  # now, so the model is built with any chat tokens this adds

    def _rows(self) -> tuple[list, list]:
        train = list(self.source.rows())
        if self.val_source is not None:
            val = list(self.val_source.rows())
        else:  # by a hash of the prompt, so rows repeating a prompt (e.g. several pairs for one) stay on one side

            def is_val(where, row) -> bool:
                prompt = json.dumps(self._eval_example(row, where)[0], sort_keys=True)
                return zlib.crc32(f"{self.seed}|{prompt}".encode()) % 10_000 < self.val_fraction * 10_000

            flags = [is_val(where, row) for where, row in train]
            train, val = [r for r, v in zip(train, flags) if not v], [r for r, v in zip(train, flags) if v]
        return train, val

    def _fit(self, ids: list[int], mask: list[bool], counts: dict) -> tuple[list, list] | None:
        """Apply the over-long policy to a sequence of seq_len + 1 tokens at most; None = drop it."""
        if len(ids) <= self.seq_len + 1:
            return ids, mask
        counts["overlong"] += 1
        if self.overlong == "drop":
            return None
        ids, mask = ids[: self.seq_len + 1], mask[: self.seq_len + 1]
        return (ids, mask) if any(mask[1:]) else None  # nothing left to learn from

    def prepare(self):
        train_rows, val_rows = self._rows()
        self.stats = {}
        splits = {}
        encoded = {}
        for split, rows in (("train", train_rows), ("val", val_rows)):  # every row is checked before any verdict
            counts = {"rows": len(rows), "overlong": 0, "kept": 0}
            samples = [s for s in (self._encode(row, where, counts) for where, row in rows) if s is not None]
            counts["kept"] = len(samples)
            encoded[split] = counts, samples
        for split, (counts, samples) in encoded.items():
            if not counts["rows"]:
                raise DataError(
                    f"data: {self.source.describe()} gave no training rows"
                    if split == "train"
                    else "data: no validation rows (set post_data.val or raise task.data.val_fraction)"
                )
            same = f", {counts['identical']} with chosen == rejected (dropped)" if counts.get("identical") else ""
            if not samples:
                raise DataError(
                    f"data: no usable {split} row: {counts['overlong']} of {counts['rows']} longer than "
                    f"trainer.seq_len={self.seq_len} (task.data.overlong={self.overlong}){same}"
                )
            self.stats[split] = counts
            splits[split] = samples
            logger.info(
                f"data: {split}: {counts['rows']} rows, {counts['overlong']} longer than "
                f"{self.seq_len} tokens ({'dropped' if self.overlong == 'drop' else 'truncated'}){same}, "
                f"{counts['kept']} kept"
            )
        self.eval_examples = [self._eval_example(row, where) for where, row in val_rows[: self.eval_samples]]
        self.train = TokenRows(self._finish(splits["train"]), self.tokenizer.pad_token_id)
        self.val = TokenRows(splits["val"], self.tokenizer.pad_token_id)
        return self

    def _finish(self, samples: list[dict]) -> list[dict]:
        return samples


class SFTData(_PostTrainData):
    """Conversations (`messages`) or prompt/response rows -> SFT samples; loss only on assistant tokens."""

    def __init__(
        self,
        tokenizer,
        source,
        seq_len: int,
        val_source=None,
        val_fraction: float = 0.05,
        packing: bool = False,
        overlong: str = "truncate",
        messages_field: str = "messages",
        prompt_field: str = "prompt",
        response_field: str = "response",
        system_field: str | None = None,
        eval_samples: int = 200,
        seed: int = 0,
    ):
        super().__init__(tokenizer, source, seq_len, val_source, val_fraction, overlong, eval_samples, seed)
        self.packing = packing
        self.fields = dict(
            messages_field=messages_field,
            prompt_field=prompt_field,
            response_field=response_field,
            system_field=system_field,
        )

    def _encode(self, row, where, counts):
        ids, mask = encode_chat(self.tokenizer, to_messages(row, where, **self.fields))
        fitted = self._fit(ids, mask, counts)
        return shifted(*fitted) if fitted else None

    def _finish(self, samples):
        if not self.packing:
            return samples
        rows = pack(samples, self.seq_len)
        logger.info(f"data: packed {len(samples)} samples into {len(rows)} rows of {self.seq_len} tokens")
        return rows

    def _eval_example(self, row, where):
        messages = to_messages(row, where, **self.fields)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]["content"]


class PreferenceData(_PostTrainData):
    """(prompt, chosen, rejected) rows -> paired samples. prompt: a string or a message list; chosen/rejected: a
    string (the assistant reply) or a message list (the assistant turn(s) that follow the prompt, or the whole
    conversation starting with the prompt's turns)."""

    def __init__(
        self,
        tokenizer,
        source,
        seq_len: int,
        val_source=None,
        val_fraction: float = 0.05,
        overlong: str = "truncate",
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        eval_samples: int = 200,
        seed: int = 0,
    ):
        super().__init__(tokenizer, source, seq_len, val_source, val_fraction, overlong, eval_samples, seed)
        self.fields = (prompt_field, chosen_field, rejected_field)

    def _messages(self, row, where):
        prompt_field, chosen_field, rejected_field = self.fields
        prompt = row.get(prompt_field)
        if isinstance(prompt, list):
            prompt = [check_message(m, where, i) for i, m in enumerate(prompt)]
        else:
            prompt = [{"role": "user", "content": require_text(row, prompt_field, where)}]
        replies = []
        for field in (chosen_field, rejected_field):
            value = row.get(field)
            if isinstance(value, list):
                reply = [check_message(m, where, i) for i, m in enumerate(value)]
                if reply[: len(prompt)] == prompt:  # whole conversations (e.g. ultrafeedback_binarized): the turns
                    reply = reply[len(prompt) :]  # after the prompt are the reply
                if not reply or reply[-1]["role"] != "assistant":
                    raise DataError(f"{where}: field {field!r} must end with an assistant message (after the prompt)")
                replies.append(reply)
            else:
                replies.append([{"role": "assistant", "content": require_text(row, field, where)}])
        return prompt, replies[0], replies[1]

    def _encode(self, row, where, counts):
        prompt, chosen, rejected = self._messages(row, where)
        if chosen == rejected:  # no preference to learn: a zero-gradient pair, dropped and counted
            counts["identical"] = counts.get("identical", 0) + 1
            return None
        sample, sides = {}, {"overlong": 0}
        for side, reply in ((CHOSEN, chosen), (REJECTED, rejected)):
            ids, mask = encode_chat(self.tokenizer, prompt + reply)
            fitted = self._fit(ids, mask, sides)
            if fitted is None:
                break
            s = shifted(*fitted)
            sample[side_key(side, INPUT_IDS)], sample[side_key(side, LABELS)] = s[INPUT_IDS], s[LABELS]
        counts["overlong"] += bool(sides["overlong"])  # a pair counts once, whichever side was too long
        return sample if len(sample) == 4 else None

    def _eval_example(self, row, where):
        prompt, chosen, _ = self._messages(row, where)
        return prompt, chosen[-1]["content"]
