"""Expected failures, each with the exit code its job returns; anything else is a bug and propagates
with its traceback.

Exit codes of every job: 0 ok, 1 failure, 2 usage (a bad argument or input, or a name that does not
exist), 3 refused (a gate said no, e.g. promoting random weights without --force), 4 drift (score
--fail-on-drift: the night is published, a product's scores drifted). An uncaught bug also
ends the process with 1, but with a traceback instead of one line.
"""
from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_REFUSED, EXIT_DRIFT = 0, 1, 2, 3, 4


class PipelineError(Exception):
    """An expected failure the user can act on; its message says what and why."""
    exit_code = EXIT_FAILURE
    label = "error"


class UsageError(PipelineError, ValueError):
    """A bad argument, config or input (a ValueError too, for callers that catch those)."""
    exit_code = EXIT_USAGE


class NotFoundError(UsageError, LookupError):
    """A named thing does not exist: model version or alias, archive partition, product."""


class RefusedError(PipelineError):
    """A gate refused the action; nothing was changed."""
    exit_code = EXIT_REFUSED
    label = "refused"
