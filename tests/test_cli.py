"""One error policy for every job: an expected failure is one line and its exit code; a bug keeps its traceback."""
import pytest

from jobs import ingest as ingest_job
from jobs import score as score_job
from jobs.cli import entrypoint
from pipeline.errors import EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE, NotFoundError, PipelineError, RefusedError, UsageError


@pytest.mark.parametrize("error,code,label", [
    (PipelineError("the store is down"), EXIT_FAILURE, "error"),
    (UsageError("bad date"), EXIT_USAGE, "error"),
    (NotFoundError("no such alias"), EXIT_USAGE, "error"),
    (RefusedError("random weights"), EXIT_REFUSED, "refused"),
])
def test_expected_failures_are_one_line_and_their_exit_code(capsys, error, code, label):
    @entrypoint("job")
    def main(argv=None):
        raise error

    assert main([]) == code
    err = capsys.readouterr().err
    assert err == f"job: {label}: {error}\n"  # one line, no traceback


def test_a_bug_propagates_with_its_traceback():
    @entrypoint("job")
    def main(argv=None):
        return {}["missing"]

    with pytest.raises(KeyError):
        main([])


def test_a_library_invariant_is_not_reported_as_a_bad_argument(monkeypatch):
    """Jobs used to turn any RuntimeError (an invariant of the library, e.g. rows out != rows in) into exit 2."""
    def broken(*args, **kwargs):
        raise RuntimeError("wrote 3 score rows for 5 input rows")

    monkeypatch.setattr(score_job, "init_ray", lambda: None)
    monkeypatch.setattr(score_job, "score_night", broken)
    with pytest.raises(RuntimeError, match="3 score rows for 5"):
        score_job.main(["--deployment", "d", "--archive", "a", "--date", "2026-11-22", "--output", "o"])


def test_a_bad_argument_of_a_real_job_is_a_usage_error(tmp_path, synthetic_src, capsys):
    rc = ingest_job.main([synthetic_src, "--archive", str(tmp_path), "--deployment", "d", "--date", "2026-02-31"])
    assert rc == EXIT_USAGE
    assert capsys.readouterr().err.startswith("ingest: error: date '2026-02-31' must be a calendar date")
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors exit 2 as well
        ingest_job.main([synthetic_src])
    assert e.value.code == EXIT_USAGE
