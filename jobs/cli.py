"""The one error policy of every job: an expected failure (pipeline.errors.PipelineError) prints one line
and returns its exit code; anything else is a bug and propagates with its traceback (exit 1).

Exit codes: 0 ok, 1 failure, 2 usage (argparse's own errors included), 3 refused.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

from pipeline.errors import PipelineError


def entrypoint(prog: str) -> Callable:
    """Decorate a job's ``main(argv) -> int`` with the error policy."""
    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except PipelineError as e:
                print(f"{prog}: {e.label}: {e}", file=sys.stderr)
                return e.exit_code
        return run
    return wrap
