"""The one error policy of every job: an expected failure (pipeline.errors.PipelineError) prints one line
and returns its exit code; anything else is a bug and propagates with its traceback (exit 1).

Exit codes: 0 ok, 1 failure, 2 usage (argparse's own errors included), 3 refused.
SIGTERM (a scheduler stopping the job) unwinds like an exception (Ray's driver installs the same), so open
MLflow runs end FAILED and unpublished outputs are removed when Python gets to run; a SIGKILL, or Ray's
native handler aborting first, leaves that to the next run of the same night (nightly.score_night).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import sys
import threading
from typing import Callable

from pipeline.errors import EXIT_OK, EXIT_REFUSED, PipelineError

PROG = "jobs.{}"  # `anople` sets "anople {}": usage lines name the command the user typed
EXIT_CODES = ("exit codes: 0 ok, 1 failure, 2 usage (bad argument or input, unknown name), 3 refused (a gate said no), "
              "4 drift (score --fail-on-drift, after publishing)")
_summary: dict = {}


class _Formatter(argparse.HelpFormatter):
    """Every option's default in --help (none where there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" not in text and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text.strip()


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        for a in self._actions:  # an option without help text still shows its default
            if not a.help and a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
                a.help = "(default: %(default)s)"
        return super().format_help()


def new_parser(verb: str, description: str) -> argparse.ArgumentParser:
    """A job's parser: defaults shown in --help, the exit codes in its epilog, and --json. Jobs import nothing
    heavy (torch, ray, mlflow) before parsing, so --help answers at once."""
    ap = _Parser(prog=PROG.format(verb), description=description, epilog=EXIT_CODES, formatter_class=_Formatter)
    ap.add_argument("--json", action="store_true",
                    help="print one JSON summary on stdout for schedulers (the human lines go to stderr)")
    return ap


def class_names(ap: argparse.ArgumentParser, items: list[str], products: list[str] | None = None) -> dict[str, str]:
    """--class-name PRODUCT="WORDS" ... -> {product: words} (quotes and spaces around the words dropped); a
    malformed item, or one naming none of `products` where given, is a usage error."""
    named = {}
    for item in items:
        product, sep, words = item.partition("=")
        product, words = product.strip(), words.strip().strip("'\"").strip()
        if not sep or not product or not words or (products is not None and product not in products):
            ap.error('--class-name wants PRODUCT="WORDS"' + (" for one of --products" if products else "")
                     + f", got {item!r}")
        named[product] = words
    return named


def summary(**fields) -> None:
    """Record what the job did: the --json summary (numbers, strings, lists and dicts of them)."""
    _summary.update(fields)


def entrypoint(prog: str) -> Callable:
    """Decorate a job's ``main(argv) -> int`` with the error policy."""
    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            as_json = "--json" in (sys.argv[1:] if argv is None else argv)
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
            _summary.clear()
            out = sys.stdout
            result: dict = {"job": prog}
            try:
                with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
                    code = main(argv)
                result.update(status="ok" if code == EXIT_OK else "error", exit_code=code, **_summary)
                return code
            except PipelineError as e:
                print(f"{prog}: {e.label}: {e}", file=sys.stderr)
                result.update(status="refused" if e.exit_code == EXIT_REFUSED else "error", exit_code=e.exit_code,
                              error=str(e), **_summary)
                return e.exit_code
            finally:
                if main_thread:
                    signal.signal(signal.SIGTERM, previous)
                if as_json and "exit_code" in result:  # argparse's own exits (--help, usage) print their text
                    print(json.dumps(result, default=_plain), file=out, flush=True)
        return run
    return wrap


def _plain(o):
    """JSON for numpy values and anything else a summary may hold."""
    return o.tolist() if hasattr(o, "tolist") else str(o)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)
