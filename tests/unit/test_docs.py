"""The docs cannot rot: every `python run.py ...` that README.md and docs/*.md show composes as `--cfg job` would
compose it, every `python -m llm...` they show parses its documented flags and exits 0 on `--help`, and every
relative link points to a file (and heading) that exists. How commands are found, and how to show one that is meant
to fail, is in docs/architecture.md ("Documented commands")."""

from __future__ import annotations

import argparse
import itertools
import re
import runpy
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

from tests.conftest import CONF, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FAILS = "fails:"  # a command whose comment starts with this is shown failing: it must NOT compose
HYDRA_FLAGS = {"-m": 0, "--multirun": 0, "--cfg": 1, "-c": 1, "--help": 0, "-h": 0, "--resolve": 0, "--info": 0}
# Placeholders a reader replaces, filled with something of the same kind (the paths are made real by `places`).
PLACEHOLDER = re.compile(r"<[^<>\n]*>")
VALUES = {"N": "2"}  # an override's whole value as a placeholder: trainer.nproc_per_node=N
# A command in a code block: run.py started by python, torchrun or srun, or a module of llm.
SHOWN = re.compile(r"(srun )?(python run\.py|torchrun .*\brun\.py|python -m llm[.\w]*)(\s|$)")


@dataclass(frozen=True)
class Command:
    where: str  # docs/file.md:line
    text: str  # the command as shown (continuations joined, comment cut off)
    comment: str
    inline: bool = False

    def __str__(self):
        return self.where


def split_comment(line: str) -> tuple[str, str]:
    """A shell line cut at its comment (a `#` that starts a word outside quotes): (code, comment)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def fences(lines: list[str]) -> tuple[set[int], list[tuple[int, str]]]:
    """The (1-based) numbers of the lines of fenced code blocks, and the lines of those that are not Python."""
    fenced, shell, inside, lang = set(), [], False, ""
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced.add(n)
            inside, lang = (not inside), line.strip()[3:].strip()
        elif inside:
            fenced.add(n)
            if lang != "python":
                shell.append((n, line))
    return fenced, shell


def segments(code: str) -> list[str]:
    """A shell line's commands (split at `|`, `&&`, `;`), a `|` inside a <placeholder> left alone."""
    held = PLACEHOLDER.findall(code)
    parts = re.split(r"\s(?:\||&&|;)\s", PLACEHOLDER.sub("\0", code))
    out = []
    for part in parts:
        while "\0" in part:
            part = part.replace("\0", held.pop(0), 1)
        out.append(part.strip())
    return out


def commands(path: Path) -> list[Command]:
    """The commands a doc shows: shell lines in its code blocks (continuations joined, one per `|` / `&&` / `;`
    segment) and inline code that starts with `python run.py` or `python -m llm`."""
    rel = path.relative_to(ROOT).as_posix()
    text = path.read_text(encoding="utf-8")
    fenced, shell = fences(text.splitlines())
    found, pending = [], None
    for n, line in shell:
        if pending is None and line.lstrip().startswith("#"):  # a shell comment (or #SBATCH)
            continue
        code, comment = split_comment(line)
        if pending is not None:
            n, code, comment = pending[0], f"{pending[1]} {code.strip()}", pending[2] or comment
        if code.endswith("\\"):
            pending = (n, code[:-1].rstrip(), comment)
            continue
        pending = None
        found += [Command(f"{rel}:{n}", s, comment) for s in segments(code) if SHOWN.match(s)]
    prose = "\n".join("" if n in fenced else line for n, line in enumerate(text.splitlines(), 1))
    for m in re.finditer(r"`([^`]+)`", prose):
        inline = " ".join(m.group(1).replace("\\|", "|").split())
        if re.match(r"python (run\.py|-m llm)\b", inline):
            found.append(Command(f"{rel}:{prose.count(chr(10), 0, m.start()) + 1}", inline, "", inline=True))
    return found


ALL = [c for doc in DOCS for c in commands(doc)]
RUN = [c for c in ALL if "run.py" in c.text.split()]
MODULES = [c for c in ALL if c not in RUN]
# `python -m llm.generate` alone as inline code names the module (its --help is checked): the others must parse.
MODULE_USES = [c for c in MODULES if not (c.inline and len(c.text.split()) == 3)]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """Real paths for the placeholders: a run dir with a checkpoint dir, and a model dir."""
    base = tmp_path_factory.mktemp("docs")
    (base / "run" / "checkpoints" / "step_0000010").mkdir(parents=True)
    (base / "hf_model").mkdir()
    return {
        "run": str(base / "run"),
        "checkpoint": str(base / "run" / "checkpoints" / "step_0000010"),
        "hf": str(base / "hf_model"),
    }


def fill(text: str, places: dict[str, str]) -> str:
    """The command with its `<placeholders>` and `$VARIABLES` replaced by values that compose."""

    def path(m):
        words = m.group(0).lower()
        kind = "hf" if "hf" in words else "checkpoint" if "checkpoint" in words else "run"
        return places[kind]

    return re.sub(r"\$\{?\w+\}?", "1", PLACEHOLDER.sub(path, text))


def overrides_of(cmd: Command, places) -> tuple[list[str], bool]:
    """The overrides after run.py (Hydra's own flags left out), and whether -m was given."""
    tokens = shlex.split(fill(cmd.text, places))
    args = tokens[tokens.index("run.py") + 1 :]
    overrides, flags, skip = [], [], 0
    for arg in args:
        if skip:
            skip -= 1
        elif arg in HYDRA_FLAGS:
            flags.append(arg)
            skip = HYDRA_FLAGS[arg]
        else:
            key, eq, value = arg.partition("=")
            overrides.append(f"{key}={VALUES[value]}" if eq and value in VALUES else arg)
    return overrides, bool({"-m", "--multirun"} & set(flags))


def sweep_variants(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists a sweep runs, enough to try each value once: every swept key at its first value, then
    each other value of one key at a time. An interval search contributes its lower end."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        key = o.input_line.split("=", 1)[0]
        if not o.is_sweep_override():
            choices.append([o.input_line])
            continue
        assert multirun, f"`{o.input_line}` is a sweep: it needs -m"
        if isinstance(o.value(), IntervalSweep):
            start = o.value().start
            values = [str(int(start) if "int" in o.value().tags else start)]
        else:
            values = list(o.sweep_string_iterator())
        choices.append([f"{key}={v}" for v in values])
    first = [c[0] for c in choices]
    variants = [first]
    for i, options in enumerate(choices):
        variants += [[*first[:i], other, *first[i + 1 :]] for other in options[1:]]
    return variants


COMPOSED: set[tuple[str, ...]] = set()  # override lists already composed (several pages show `python run.py`)


def compose_all(overrides: list[str], multirun: bool) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for variant in sweep_variants(overrides, multirun):
            if tuple(variant) not in COMPOSED:
                cfg = compose("config", overrides=variant, return_hydra_config=True)
                assert cfg.task.name and cfg.hydra.help.template  # what --cfg job prints, and --help's text
                COMPOSED.add(tuple(variant))


def test_the_docs_show_commands():
    """The extraction finds the commands (a change to the docs' format that hid them would pass every test)."""
    assert len(RUN) >= 50 and len(MODULES) >= 20, (len(RUN), len(MODULES))
    assert any(c.comment.startswith(FAILS) for c in RUN)


@pytest.mark.parametrize("cmd", RUN, ids=str)
def test_run_command_composes(cmd, places):
    """A documented `python run.py ...` composes (each value of a sweep); one marked `# fails: ...` does not."""
    try:
        overrides, multirun = overrides_of(cmd, places)
        compose_all(overrides, multirun)
    except Exception as e:  # Hydra's own errors (unknown key, option, bad syntax) and ours above
        if cmd.comment.startswith(FAILS):
            return
        why = " ".join(str(e).split())[:500]
        pytest.fail(f"{cmd.where}: `{cmd.text}` does not compose: {type(e).__name__}: {why}", pytrace=False)
    if cmd.comment.startswith(FAILS):
        pytest.fail(f"{cmd.where}: `{cmd.text}` is marked '# {FAILS}' but composes", pytrace=False)


class _Parsed(Exception):
    """Raised in place of running a module once its arguments parsed."""


def run_module(module: str, argv: list[str], monkeypatch) -> int | None:
    """`python -m module argv` in this process up to its argument parsing: the exit code argparse gave (0 for
    --help, 2 for a flag it does not know), or None when the arguments parsed."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        m.setattr(sys, "argv", [module, *argv])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except _Parsed:
            return None
        except SystemExit as e:
            return e.code
    raise AssertionError(f"{module} never parsed its arguments")


def module_argv(cmd: Command, places) -> tuple[str, list[str]]:
    tokens = shlex.split(fill(cmd.text, places))
    i = tokens.index("-m")
    return tokens[i + 1], tokens[i + 2 :]


@pytest.mark.parametrize("cmd", MODULE_USES, ids=str)
def test_module_command_parses(cmd, places, monkeypatch, capsys):
    """A documented `python -m llm...` takes the flags it is shown with."""
    module, argv = module_argv(cmd, places)
    code = run_module(module, argv, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code is None, f"{cmd.where}: `{cmd.text}` is refused by {module}: {err[-1] if err else code}"


@pytest.mark.parametrize("module", sorted({re.search(r"-m (\S+)", c.text).group(1) for c in MODULES}))
def test_module_help_exits_0(module, monkeypatch, capsys):
    assert run_module(module, ["--help"], monkeypatch) == 0
    assert "usage:" in capsys.readouterr().out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced, _ = fences(lines)
    return {slug(line.lstrip("#")) for n, line in enumerate(lines, 1) if line.startswith("#") and n not in fenced}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    """Every link to a file of the repository points to one that exists, and its #anchor to a heading there."""
    text = doc.read_text(encoding="utf-8")
    bad = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        where = f"{doc.relative_to(ROOT).as_posix()}:{text.count(chr(10), 0, m.start()) + 1}"
        if not path.exists():
            bad.append(f"{where}: {target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{where}: {target}: no heading with that anchor")
    assert not bad, "\n".join(bad)


def test_no_sweep_combinations_are_lost():
    """sweep_variants tries every value of every swept key (each list once), with the others at their first."""
    variants = sweep_variants(["a=1,2", "b=x,y,z", "c=3"], multirun=True)
    assert variants[0] == ["a=1", "b=x", "c=3"] and len(variants) == 4
    tried = {o for v in variants for o in v}
    assert tried == {"a=1", "a=2", "b=x", "b=y", "b=z", "c=3"}
    assert list(itertools.chain(*sweep_variants(["lr=tag(log, interval(1e-4, 1e-2))"], True))) == ["lr=0.0001"]
