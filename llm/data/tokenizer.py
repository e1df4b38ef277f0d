"""Tokenizers: a byte-level BPE trained on the training corpus (the default, cached on disk), or any pretrained
tokenizer that `transformers.AutoTokenizer` can load (a hub name such as `gpt2`, or a local directory).

Both return a `transformers.PreTrainedTokenizerFast` with BOS, EOS and PAD tokens set. `token_byte_lengths`
says how many UTF-8 bytes of text each token id stands for (bits per byte divides a loss by them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from loguru import logger

from llm.data.cache import discard, entry_lock, missing_entry, read_entry_json
from llm.data.chat import ASSISTANT, BUILTIN_TEMPLATE, END, SYSTEM, USER
from llm.data.hub import hub_call
from llm.errors import ConfigError, DataError
from llm.utils.files import atomic_dir

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT = [SYSTEM, USER, ASSISTANT, END]  # reserved from the start, so SFT after pretraining needs no new rows


def _cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(str(cache_dir)))


def train_bpe(
    corpus,
    vocab_size: int = 4096,
    cache_dir: str = "~/.cache/llm",
    min_frequency: int = 2,
    max_train_bytes: int | None = 50_000_000,
):
    """Train (or load from cache) a byte-level BPE on `corpus` (a source from llm.data.sources).

    The cache key is the corpus fingerprint plus the training settings, so a second run loads in milliseconds.
    A damaged cache entry is trained again (with a warning naming it); concurrent runs train it once.
    """
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 264:
        raise ConfigError(
            f"tokenizer.vocab_size={vocab_size!r} must be an integer >= 264 (256 bytes + 7 special tokens)"
        )
    key = hashlib.sha256(
        f"bpe-v2|{corpus.fingerprint()}|{vocab_size}|{min_frequency}|{max_train_bytes}".encode()
    ).hexdigest()[:16]
    path = _cache_root(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}"
    with entry_lock(path.with_name(path.name + ".lock")) as writable:  # one process trains; the others wait
        cached = _load_cached(path)
        if cached is not None:
            logger.info(f"tokenizer: cached byte-level BPE ({vocab_size}) from {path}")
            return cached
        if not writable:  # a read-only shared cache that lacks this tokenizer
            raise missing_entry("tokenizer", path)
        fast = _train(corpus, vocab_size, min_frequency, max_train_bytes)
        with atomic_dir(path, suffix=f".tmp{os.getpid()}") as tmp:  # replaces a damaged entry _load_cached gave up on
            fast.save_pretrained(str(tmp))  # whole or not at all: a kill leaves only a .tmp dir
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _load_cached(path: Path):
    """The cached tokenizer in `path`, or None when there is none or it is damaged (a truncated or garbled file:
    removed with a warning naming it, to be trained again)."""
    from transformers import PreTrainedTokenizerFast

    if not path.exists():
        return None
    if not (path / "tokenizer.json").is_file():
        discard(path, "tokenizer", "has no tokenizer.json")
        return None
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).exists() and read_entry_json(path / name, "tokenizer") is None:
            discard(path, "tokenizer", f"has a damaged {name}")
            return None
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as e:  # parseable JSON that is not a tokenizer
        discard(path, "tokenizer", f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None


def _train(corpus, vocab_size: int, min_frequency: int, max_train_bytes: int | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    logger.info(f"tokenizer: training a byte-level BPE of {vocab_size} tokens on {corpus.describe()}")

    def texts():
        seen = 0
        for row in corpus.load():
            text = row["text"]
            yield text
            seen += len(text)
            if max_train_bytes and seen >= max_train_bytes:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS, PAD, *CHAT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    if tok.get_vocab_size() <= 263:
        raise DataError(f"tokenizer: the corpus ({corpus.describe()}) is too small or empty to train a BPE")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=CHAT
    )
    fast.chat_template = BUILTIN_TEMPLATE
    return fast


def load_pretrained(name_or_path: str, trust_remote_code: bool = False):
    """Load any tokenizer AutoTokenizer knows: a local directory or a hub name (needs network the first time).
    A missing PAD token is set to EOS; a missing BOS to EOS."""
    from transformers import AutoTokenizer

    if not name_or_path:
        raise ConfigError("tokenizer.name_or_path is empty")
    local = os.path.expanduser(str(name_or_path))
    if str(name_or_path).startswith((".", "/", "~")) and not os.path.isdir(local):
        raise DataError(f"tokenizer.name_or_path={name_or_path!r}: no such directory")

    def load():
        return AutoTokenizer.from_pretrained(
            local if os.path.isdir(local) else name_or_path, trust_remote_code=trust_remote_code
        )

    try:
        tok = load() if os.path.isdir(local) else hub_call("tokenizer.name_or_path", name_or_path, load)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"tokenizer.name_or_path={name_or_path!r}: not a tokenizer directory and not loadable from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not getattr(tok, "is_fast", False):
        raise DataError(f"tokenizer.name_or_path={name_or_path!r}: only fast (Rust) tokenizers are supported")
    if tok.eos_token is None:
        raise DataError(f"tokenizer.name_or_path={name_or_path!r} has no EOS token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that changes the token ids produced."""
    backend = tokenizer.backend_tokenizer.to_str()
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, len(tokenizer))
    return hashlib.sha256(f"{backend}|{specials}".encode()).hexdigest()[:16]


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece's byte tokens: one byte each


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for ([len(tokenizer)] int32); special tokens (EOS, BOS, PAD, chat
    markers) count 0 bytes. The sum over the tokens of a text is the byte length of that text.

    Byte-level BPE (ours, GPT-2, Llama 3): every character of a token is one byte of the 256-character alphabet,
    so a token that holds part of a multi-byte character still counts exactly its own bytes. Other vocabularies
    (SentencePiece, WordPiece): `<0xNN>` is one byte, the word-start marker '▁' a space, WordPiece's '##' nothing."""
    specials = set(tokenizer.all_special_ids)
    specials |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    byte_level = '"ByteLevel"' in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    table = np.zeros(max(len(tokenizer), max(vocab.values(), default=-1) + 1), dtype=np.int32)
    for tok, i in vocab.items():
        if i in specials:
            continue
        if byte_level:
            table[i] = len(tok)
        elif _BYTE_FALLBACK.match(tok):
            table[i] = 1
        else:
            table[i] = len(tok.removeprefix("##").replace("\u2581", " ").encode("utf-8"))
    return table
