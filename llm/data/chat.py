"""Chat formatting and loss masks.

A conversation is a list of {role, content} messages (roles: system, user, assistant). The tokenizer's own chat
template is used when it has one; otherwise the built-in one below is installed on the tokenizer (its special
tokens are added, and the template is saved with the tokenizer in every checkpoint):

    <|bos|><|system|>You are...<|end|><|user|>add: 2 + 3<|end|><|assistant|>5<|end|>

`encode_chat` returns token ids and a mask that is True exactly on assistant tokens (content and the closing
<|end|>, so the model learns to stop): the only tokens that carry loss in SFT and whose log-probs DPO sums.
"""

from __future__ import annotations

from llm.errors import DataError

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)  # the built-in template's special tokens
BUILTIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def ensure_chat_template(tokenizer):
    """Give the tokenizer the built-in template (and its special tokens) unless it has a template of its own."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    missing = [t for t in (SYSTEM, USER, ASSISTANT, END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = BUILTIN_TEMPLATE
    return tokenizer


def reserved_chat_template(tokenizer):
    """Give a tokenizer without a chat template the built-in one when its tokens are already in the vocabulary (a
    pretraining run's BPE reserves them), so a model can chat without new embedding rows; returns the tokenizer."""
    if not getattr(tokenizer, "chat_template", None) and all(t in tokenizer.get_vocab() for t in CHAT_TOKENS):
        tokenizer.chat_template = BUILTIN_TEMPLATE
    return tokenizer


def uses_builtin_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) == BUILTIN_TEMPLATE


def stop_token_id(tokenizer) -> int:
    """The token that ends an assistant turn: <|end|> for the built-in template; for a template of the tokenizer's
    own, the first special token it writes after a reply (Gemma's <end_of_turn>, ChatML's <|im_end|>, Llama 3's
    <|eot_id|>), so that SFT's replies and generation stop at the same token; else EOS."""
    if uses_builtin_template(tokenizer):
        return tokenizer.convert_tokens_to_ids(END)
    if getattr(tokenizer, "chat_template", None):
        reply = "2 3 5 7"
        probe = [{"role": "user", "content": "primes?"}, {"role": "assistant", "content": reply}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template that needs other roles or fields: EOS it is
            return tokenizer.eos_token_id
        if reply in text:
            special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
            after = _ids(tokenizer, text[text.rindex(reply) + len(reply) :])
            return next((i for i in after if i in special), tokenizer.eos_token_id)
    return tokenizer.eos_token_id


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and the assistant mask (True where a token is part of an assistant turn)."""
    if uses_builtin_template(tokenizer):
        ids, mask = [tokenizer.bos_token_id], [False]
        for m in messages:
            head = [tokenizer.convert_tokens_to_ids(ROLE_TOKENS[m["role"]])]
            body = _ids(tokenizer, m["content"]) + [tokenizer.convert_tokens_to_ids(END)]
            assistant = m["role"] == "assistant"
            ids += head + body
            mask += [False] * len(head) + [assistant] * len(body)
        if add_generation_prompt:
            ids.append(tokenizer.convert_tokens_to_ids(ASSISTANT))
            mask.append(False)
        return ids, mask
    # A foreign template: render the text, find each assistant turn's character span from rendered prefixes, and
    # mark the tokens that overlap a span (token offsets), so BPE merges across a boundary cannot misalign it.
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages, add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (text.startswith(before) and text.startswith(through)):
                raise DataError(
                    "the tokenizer's chat template does not render conversations as growing prefixes; "
                    "cannot locate the assistant turns"
                )
            spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def to_messages(
    row: dict,
    where: str,
    messages_field: str = "messages",
    prompt_field: str = "prompt",
    response_field: str = "response",
    system_field: str | None = None,
) -> list[dict]:
    """A row -> messages: a `messages` list, or a prompt/response pair (strings). Errors name `where`."""
    if messages_field in row and row[messages_field] is not None:
        messages = row[messages_field]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field {messages_field!r} must be a non-empty list of messages")
        out = [check_message(m, where, i) for i, m in enumerate(messages)]
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: the conversation has no assistant message")
        return out
    prompt = require_text(row, prompt_field, where, also=messages_field)
    response = require_text(row, response_field, where)
    out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if system_field and row.get(system_field):
        out.insert(0, {"role": "system", "content": require_text(row, system_field, where)})
    return out


def check_message(m, where: str, i: int) -> dict:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
    if m["role"] not in ROLE_TOKENS:
        raise DataError(f"{where}: message {i} has role {m['role']!r}; allowed: {sorted(ROLE_TOKENS)}")
    if not isinstance(m["content"], str) or not m["content"].strip():
        raise DataError(f"{where}: message {i} ({m['role']}) has empty content")
    return {"role": m["role"], "content": m["content"]}


def require_text(row: dict, field: str, where: str, also: str | None = None) -> str:
    if field not in row or row[field] is None:
        alt = f" (or {also!r})" if also else ""
        raise DataError(f"{where}: missing field {field!r}{alt}")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value
