"""Several `python run.py <args>` in one interpreter, one after the other, each as the command line runs it: run.py
executed as __main__ (its checks before Hydra, Hydra, the job, its exit code), with stdout and stderr captured.
Torch, Hydra and the project are imported once instead of once per run: for the many runs of the bad-input
tests, which stop before any work. Reads a JSON list of argument lists on stdin; writes one line per run to
stdout, `RESULT {"returncode": ..., "stdout": ..., "stderr": ...}`."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import traceback
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from loguru import logger

RUN = str(Path(__file__).resolve().parent.parent / "run.py")
MARK = "RESULT "


def run_once(args: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv, code = [RUN, *args], 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(RUN, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught exception, and its exit code
            traceback.print_exc()
            code = 1
    GlobalHydra.instance().clear()  # the next run composes its config afresh
    logger.remove()  # sinks of this run (its train.log, the captured stderr)
    return {"returncode": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


if __name__ == "__main__":
    sys.path[0] = str(Path(RUN).parent)  # as for `python run.py`: the project's root first
    for arg_list in json.load(sys.stdin):
        print(MARK + json.dumps(run_once(arg_list)), flush=True)
