"""Generate from a trained model in the terminal: complete a prompt, answer one chat turn, or chat interactively.

    python -m llm.generate outputs/2026-01-01/12-00-00 --prompt "def main("     # a run dir: its newest checkpoint
    python -m llm.generate <checkpoint dir | HF model dir> --chat --prompt "sort: pear apple fig"
    python -m llm.generate <dir>                      # on a terminal, no --prompt: an interactive chat
    echo "def " | python -m llm.generate <dir> --temperature 0 --max-new-tokens 40   # the prompt from a pipe

Tokens are printed as they come. Nothing is written: no run dir, no files. The interactive chat keeps the whole
conversation as the context of every reply; `/reset` starts over, `/exit` or Ctrl-D ends it.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from llm.data.chat import encode_chat, reserved_chat_template, stop_token_id
from llm.errors import ConfigError, DataError, LLMError
from llm.tasks.source import ModelSource


def load_model(path: str, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a run dir (its newest complete checkpoint), a checkpoint dir, a
    Hugging Face model dir or a hub name (owner/name)."""
    model, tokenizer = ModelSource.resolve(path, key="model").load()
    return model.to(device), tokenizer


class Generator:
    """Streams completions and chat replies of one model; `messages` is the conversation so far."""

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int = 0,
        system: str | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        self.device = next(model.parameters()).device
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self.system = system
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _stream(self, ids: list[int], stop: int, out) -> str:
        """Generate after `ids`, printing the text as it grows; returns the generated text."""
        new: list[int] = []
        shown = ""
        x = torch.tensor([ids], device=self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # past the trained context: the user sees the result
            for token in self.model.stream(x, eos_token_id=stop, generator=self.rng, **self.settings):
                if token.item() == stop:
                    break
                new.append(token.item())
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # a multi-byte character is complete
                    out.write(text[len(shown) :])
                    out.flush()
                    shown = text
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        out.write(text[len(shown) :])
        out.flush()
        return text

    def complete(self, prompt: str, out) -> str:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.tokenizer.bos_token_id]
        return self._stream(ids, self.tokenizer.eos_token_id, out)

    def reply(self, user: str, out) -> str:
        """The assistant's reply to `user` after the conversation so far; both join the conversation."""
        self.messages.append({"role": "user", "content": user})
        ids = encode_chat(self.tokenizer, self.messages, add_generation_prompt=True)[0]
        text = self._stream(ids, stop_token_id(self.tokenizer), out)
        self.messages.append({"role": "assistant", "content": text.strip()})
        return text


def interactive(gen: Generator, stdin, out) -> None:
    """Read a user turn per line, stream each reply; the conversation carries over until /reset."""
    out.write("chat: one message per line; /reset starts over, /exit or Ctrl-D ends\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            out.write("\n" if not line else "")
            return
        if line.strip() == "/reset":
            gen.reset()
            continue
        if line.strip():
            gen.reply(line.strip(), out)
            out.write("\n")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m llm.generate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a run dir (its newest checkpoint), a checkpoint dir or a Hugging Face model dir")
    p.add_argument(
        "--prompt",
        help="the text to complete (with --chat: the user's message); default: read stdin, "
        "or an interactive chat on a terminal",
    )
    p.add_argument("--chat", action="store_true", help="apply the chat template: the prompt is a user turn")
    p.add_argument("--system", help="a system message before the conversation (chat only)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="0: no top-k filtering")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p.parse_args(argv)


def main(argv=None, stdin=None, stdout=None) -> int:
    args = parse_args(argv)
    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    try:
        if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
            raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model, tokenizer = load_model(args.model, device)
        gen = Generator(
            model,
            tokenizer,
            args.max_new_tokens,
            args.temperature,
            args.top_k or None,
            args.top_p,
            args.seed,
            args.system,
        )
        chatting = args.chat or (args.prompt is None and stdin.isatty())
        if chatting and not getattr(reserved_chat_template(tokenizer), "chat_template", None):
            raise DataError(f"{args.model}: its tokenizer has no chat template; generate without --chat")
        if args.prompt is None and stdin.isatty():
            interactive(gen, stdin, out)
            return 0
        prompt = args.prompt if args.prompt is not None else stdin.read().rstrip("\n")
        gen.reply(prompt, out) if chatting else gen.complete(prompt, out)
        out.write("\n")
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
