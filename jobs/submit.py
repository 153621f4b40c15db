"""python -m jobs.submit --address URL [--replace] [--no-wait] -- <verb> <verb options>

Submit a job to a Ray cluster under a deterministic submission id, so that a scheduler's retry attaches to the
job already running (or replaces one that ended) instead of starting a second: ``anople-score-<deployment>-<date>``
for a night (its 'yesterday' resolved here, once: a retry after midnight still names the same night),
``anople-<verb>-<deployment>-<hash of its arguments>`` for the other verbs. What it does with a job of that id:

    none                 submit it
    PENDING / RUNNING    attach: follow its logs to its end (--replace: stop it, then submit again)
    SUCCEEDED            nothing; exit 0 (--replace: submit again)
    FAILED / STOPPED     submit again under the same id (its record is replaced; a night resumes its rows)

Exit: the job's own status when it waits (0 succeeded, 1 otherwise), 0 with --no-wait once it is submitted.
"""
from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time

from jobs.cli import entrypoint, new_parser, summary
from pipeline.errors import EXIT_FAILURE, UsageError

SUBMITTABLE = ("train", "evaluate", "score", "report", "ingest", "promote", "add-product", "feedback", "threshold")
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def parser() -> argparse.ArgumentParser:
    ap = new_parser("submit", "Submit an anople verb to a Ray cluster under a deterministic submission id.")
    ap.add_argument("--address", default=None, help="the cluster's job server (default: RAY_API_SERVER_ADDRESS / "
                                                    "RAY_ADDRESS, as `ray job submit`)")
    ap.add_argument("--runtime-env-json", default=None, help="the job's runtime env (no credentials: see README)")
    ap.add_argument("--replace", action="store_true",
                    help="stop a running job of the same id (or redo a succeeded one) and submit again")
    ap.add_argument("--no-wait", action="store_true", help="return once it is submitted or found running")
    ap.add_argument("--python", default="python",
                    help="the cluster's Python that runs `-m jobs.<verb>` (the project image's)")
    ap.add_argument("--print-id", action="store_true", help="print the submission id and submit nothing")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- <verb> <options>: what `anople <verb>` takes")
    return ap


def _option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _clean(text: str) -> str:
    return "".join(c if c in _ID_CHARS else "_" for c in text)


def resolved_command(command: list[str]) -> list[str]:
    """The verb's arguments with a night's 'yesterday' / 'today' replaced by the date it means now: the job and
    every retry of it score the same night."""
    verb, args = command[0], list(command[1:])
    if verb == "score":
        from pipeline.sources import archive
        date = _option(args, "--date")
        if date is None:
            raise UsageError("score needs --date")
        resolved = archive.resolve_date(date, _option(args, "--timezone") or "UTC")
        for i, a in enumerate(args):
            if a == "--date":
                args[i + 1] = resolved
            elif a.startswith("--date="):
                args[i] = f"--date={resolved}"
    return [verb] + args


def job_entry(python: str, command: list[str]) -> str:
    """The job's entrypoint: the verb's module (`add-product` is jobs.add_product) run by the cluster's Python."""
    return shlex.join([python, "-m", f"jobs.{command[0].replace('-', '_')}"] + list(command[1:]))


def submission_id(command: list[str]) -> str:
    """anople-score-<deployment>-<date> for a night; anople-<verb>-<deployment>-<12 hex of its arguments> else."""
    verb, args = command[0], command[1:]
    deployment = _option(args, "--deployment") or "all"
    if verb == "score":
        return _clean(f"anople-score-{deployment}-{_option(args, '--date')}")
    digest = hashlib.sha256("\0".join(args).encode()).hexdigest()[:12]
    return _clean(f"anople-{verb}-{deployment}-{digest}")


def _wait(client, job_id: str) -> str:
    """Follow a job's logs to its end; its final status."""
    from ray.job_submission import JobStatus
    try:
        import asyncio

        async def tail():
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)
        asyncio.run(tail())
    except Exception as e:  # the log stream broke (a head restart): keep polling the status instead
        print(f"submit: log stream ended ({type(e).__name__}: {e}); polling the job's status", file=sys.stderr)
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(2)


@entrypoint("submit")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or command[0] not in SUBMITTABLE:
        raise UsageError(f"after --, name a verb ({', '.join(SUBMITTABLE)}) and its options")
    command = resolved_command(command)
    job_id = submission_id(command)
    if args.print_id:
        print(job_id)
        return 0
    import json

    from ray.job_submission import JobStatus, JobSubmissionClient
    client = JobSubmissionClient(args.address)
    runtime_env = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    entry = job_entry(args.python, command)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:  # the job server's 404 (no job of this id) is a RuntimeError like its other failures
        if "status code 404" not in str(e):
            raise
        info = None
    action = "submitted"
    if info is not None:
        status = info.status
        if status in (JobStatus.PENDING, JobStatus.RUNNING):
            if not args.replace:
                action = "attached"
            else:
                client.stop_job(job_id)
                while client.get_job_status(job_id) not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
                    time.sleep(1)
                client.delete_job(job_id)
                action = "replaced"
        elif status == JobStatus.SUCCEEDED and not args.replace:
            action = "done"
        else:
            client.delete_job(job_id)  # an ended attempt: its id is free again for this retry
            action = "resubmitted"
    if action in ("submitted", "replaced", "resubmitted"):
        client.submit_job(entrypoint=entry, submission_id=job_id, runtime_env=runtime_env)
    print(f"submit: {action} job {job_id}" + (" (it succeeded earlier; --replace runs it again)"
                                               if action == "done" else ""), file=sys.stderr, flush=True)
    summary(submission_id=job_id, action=action)
    if action == "done" or args.no_wait:
        return 0
    final = _wait(client, job_id)
    summary(job_status=final)
    print(f"submit: job {job_id} {final}", file=sys.stderr, flush=True)
    return 0 if final == "SUCCEEDED" else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
