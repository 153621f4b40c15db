"""The one error policy of every job: an expected failure (pipeline.errors.PipelineError) prints one line
and returns its exit code; anything else is a bug and propagates with its traceback (exit 1).

Exit codes: 0 ok, 1 failure, 2 usage (argparse's own errors included), 3 refused.
SIGTERM (a scheduler stopping the job) unwinds like an exception (Ray's driver installs the same), so open
MLflow runs end FAILED and unpublished outputs are removed when Python gets to run; a SIGKILL, or Ray's
native handler aborting first, leaves that to the next run of the same night (runs.score_night).
"""
from __future__ import annotations

import functools
import signal
import sys
import threading
from typing import Callable

from pipeline.errors import PipelineError


def entrypoint(prog: str) -> Callable:
    """Decorate a job's ``main(argv) -> int`` with the error policy."""
    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
            try:
                return main(argv)
            except PipelineError as e:
                print(f"{prog}: {e.label}: {e}", file=sys.stderr)
                return e.exit_code
            finally:
                if main_thread:
                    signal.signal(signal.SIGTERM, previous)
        return run
    return wrap


def _terminate(signum, frame):
    raise SystemExit(128 + signum)
