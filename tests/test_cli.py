"""One error policy for every job: an expected failure is one line and its exit code; a bug keeps its traceback.
The `anople` command: verbs, --help without heavy imports, --json summaries."""
import json
import os
import subprocess
import sys

import pytest

from jobs import ingest as ingest_job
from jobs import score as score_job
from jobs.cli import entrypoint
from pipeline.errors import (EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE, NotFoundError, PipelineError, RefusedError,
                             UsageError)


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

    import pipeline.cluster
    import pipeline.nightly.run
    monkeypatch.setattr(pipeline.cluster, "init_ray", lambda: None)
    monkeypatch.setattr(pipeline.nightly.run, "score_night", broken)
    with pytest.raises(RuntimeError, match="3 score rows for 5"):
        score_job.main(["--deployment", "d", "--archive", "a", "--date", "2026-11-22", "--output", "o"])


def test_a_bad_argument_of_a_real_job_is_a_usage_error(tmp_path, synthetic_src, capsys):
    rc = ingest_job.main([synthetic_src, "--archive", str(tmp_path), "--deployment", "d", "--date", "2026-02-31"])
    assert rc == EXIT_USAGE
    assert capsys.readouterr().err.startswith("ingest: error: date '2026-02-31' must be a calendar date")
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors exit 2 as well
        ingest_job.main([synthetic_src])
    assert e.value.code == EXIT_USAGE


VERBS = ["ingest", "train", "evaluate", "promote", "score", "report", "submit", "add-product", "feedback", "threshold"]


@pytest.mark.parametrize("verb", [None] + VERBS)
def test_help_answers_without_importing_torch_ray_or_mlflow(verb):
    """--help parses before any heavy import: what keeps it well under a second (timed in the README, not here)."""
    code = ("import sys\nfrom jobs import anople\n"
            f"try:\n    rc = anople.main({[verb, '--help'] if verb else ['--help']!r})\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print('HEAVY', [m for m in ('torch', 'ray', 'mlflow', 'open_clip', 'faiss') if m in sys.modules], rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("HEAVY [] 0")
    if verb:
        assert out.stdout.startswith(f"usage: anople {verb}") and "exit codes: 0 ok" in out.stdout
    if verb == "score":
        assert "(default: production)" in out.stdout and "--heatmap-side" in out.stdout


def test_the_console_command_is_installed_and_rejects_unknown_verbs():
    exe = os.path.join(os.path.dirname(sys.executable), "anople")
    out = subprocess.run([exe, "bogus"], capture_output=True, text=True, timeout=60)
    assert out.returncode == EXIT_USAGE and "unknown verb 'bogus'" in out.stderr
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(v in out.stdout for v in VERBS)


def test_json_prints_one_summary_on_stdout_and_the_human_lines_on_stderr(tmp_path, synthetic_src, capsys):
    from jobs import anople
    rc = anople.main(["ingest", synthetic_src, "--archive", str(tmp_path), "--deployment", "d", "--date", "2026-11-22",
                      "--json"])
    out, err = capsys.readouterr()
    summary = json.loads(out)  # stdout is exactly one JSON document
    assert rc == 0 and summary["status"] == "ok" and summary["exit_code"] == 0 and summary["job"] == "ingest"
    assert summary["rows"] > 0 and set(summary["products"]) == {"tile", "washer", "fabric"}
    assert "ingested" in err
    rc = anople.main(["ingest", synthetic_src, "--archive", str(tmp_path), "--deployment", "d", "--date", "2026-02-31",
                      "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == EXIT_USAGE and summary["status"] == "error" and summary["exit_code"] == EXIT_USAGE
    assert "calendar date" in summary["error"]


def test_json_says_refused_with_exit_code_3(capsys):
    @entrypoint("job")
    def main(argv=None):
        raise RefusedError("random weights")

    assert main(["--json"]) == EXIT_REFUSED
    assert json.loads(capsys.readouterr().out) == {"job": "job", "status": "refused", "exit_code": 3,
                                                   "error": "random weights"}


@pytest.mark.parametrize("flag,value,words", [("--heatmap-side", "0", "--heatmap-side must be a positive"),
                                              ("--batch-size", "0", "--batch-size must be at least 1"),
                                              ("--max-error-rate", "1.5", "--max-error-rate is a fraction")])
def test_a_bad_scoring_option_is_a_usage_error_before_anything_starts(monkeypatch, capsys, flag, value, words):
    """ScoreOptions checks what jobs.score parsed, once, before Ray starts or a run is opened."""
    import pipeline.cluster
    monkeypatch.setattr(pipeline.cluster, "init_ray", lambda: pytest.fail("Ray started for a bad option"))
    rc = score_job.main(["--deployment", "d", "--archive", "a", "--date", "2026-11-22", "--output", "o", flag, value])
    assert rc == EXIT_USAGE and words in capsys.readouterr().err


def test_every_verb_submits_as_its_module():
    import importlib

    from jobs.anople import VERBS as ALL
    from jobs.submit import SUBMITTABLE, job_entry
    for verb in SUBMITTABLE:
        module = job_entry("python", [verb, "--deployment", "d"]).split()[2]
        assert module == ALL[verb][0] and importlib.util.find_spec(module), verb
    assert job_entry("py", ["add-product", "--products", "a b"]) == "py -m jobs.add_product --products 'a b'"


def test_a_submission_id_names_the_deployment_and_the_night_yesterday_resolved_once():
    """Issue 24, item 5: a scheduler's retry computes the same id; 'yesterday' is pinned at submission."""
    import datetime as dt

    from jobs.submit import resolved_command, submission_id
    night = ["score", "--deployment", "line1", "--archive", "s3://a/b", "--date", "yesterday", "--output", "s3://a/c"]
    cmd = resolved_command(night)
    yesterday = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()
    assert cmd[cmd.index("--date") + 1] == yesterday and night[6] == "yesterday"
    assert submission_id(cmd) == f"anople-score-line1-{yesterday}" == submission_id(resolved_command(night))
    assert submission_id(resolved_command(night[:5] + ["--date=2026-11-21"] + night[7:])) == "anople-score-line1-2026-11-21"
    train = ["train", "--deployment", "line/1", "--archive", "s3://a/b", "--shots", "4"]
    assert submission_id(train) == submission_id(list(train)) != submission_id(train[:-1] + ["2"])
    assert submission_id(train).startswith("anople-train-line_1-")  # only characters a submission id takes


def test_class_names_are_parsed_once_for_train_and_add_product(capsys):
    import argparse

    from jobs import cli
    ap = argparse.ArgumentParser(prog="t")
    assert cli.class_names(ap, ['pcb1= "printed circuit board" ', "tile=tiles"]) == {
        "pcb1": "printed circuit board", "tile": "tiles"}
    for items, products in ((["pcb1"], None), (["pcb1="], None), (['other="x"'], ["pcb1"])):
        with pytest.raises(SystemExit):
            cli.class_names(ap, items, products)
    assert "for one of --products" in capsys.readouterr().err
