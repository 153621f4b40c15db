"""python -m jobs.bench.resume [--images 400] [--kill-at 0.5]: a night killed part-way, then rerun (issue 24, item 4).
A benchmark: prints figures, asserts nothing.

Builds a throwaway deployment in a temporary folder (synthetic products, the tiny random-init backbone, a local
MLflow store), then scores one night three times, each `jobs.score` a process of its own with its own local Ray,
as a scheduler runs it: undisturbed; started again and SIGKILLed (the job and its Ray, all at once) once about
`--kill-at` of the night's rows are committed to staging; rerun. Prints the rows committed at the kill, the rows the
rerun adopted and scored, the published rows (each once) and the wall times against the undisturbed run.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

DATE = "2026-11-26"


def _env(root: str, stage_rows: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI",
                                                            "ANOPLE_ARTIFACT_ROOT")}
    return env | {"ANOPLE_ROOT": os.path.join(root, "root"), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                  "ANOPLE_STAGE_ROWS": str(stage_rows)}


def _job(env, *argv, check=True):
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr, time.time() - t0


def _committed(night, run) -> int:
    import pyarrow.parquet as pq
    total = 0
    for uri in night.parts(run):
        try:
            total += pq.read_metadata(uri).num_rows
        except Exception:
            pass  # a part being renamed into place
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.resume", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=400, help="images in the night (2 products)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of the night committed when it is killed")
    ap.add_argument("--stage-rows", type=int, default=16, help="ANOPLE_STAGE_ROWS: rows per committed part")
    ap.add_argument("--backbone", default="anople-small-vit")
    args = ap.parse_args(argv)
    from pipeline.nightly import nights
    from pipeline.sources.synthetic import make_mvtec_folder

    root = tempfile.mkdtemp(prefix="anople-resume-")
    env = _env(root, args.stage_rows)
    arch, out = os.path.join(root, "archive"), os.path.join(root, "out")
    train = make_mvtec_folder(os.path.join(root, "train"), ("tile", "washer"), n_train=2, n_test_good=0,
                              n_test_defect=0, size=64, seed=0)
    per = max(1, args.images // 2)
    night_src = make_mvtec_folder(os.path.join(root, "night"), ("tile", "washer"), n_train=0, n_test_good=per - 3,
                                  n_test_defect=1, size=64, seed=1)
    _job(env, "jobs.ingest", train, "--archive", arch, "--deployment", "rb", "--date", "2026-11-20")
    for p in ("tile", "washer"):
        _job(env, "jobs.ingest", f"{night_src}/{p}/test", "--archive", arch, "--deployment", "rb", "--date", DATE,
             "--product", p)
    _job(env, "jobs.train", "--deployment", "rb", "--archive", arch, "--shots", "1", "--backbone", args.backbone,
         "--weights", "random", "--prompt-mode", "none")
    _job(env, "jobs.promote", "--deployment", "rb", "--from-alias", "candidate", "--to", "production", "--force")
    score = ["jobs.score", "--deployment", "rb", "--archive", arch, "--date", DATE, "--output", out,
             "--batch-size", "4"]
    night = nights.Night(out, "rb", DATE)

    _, t_clean = _job(env, *score)
    n = night.published()["rows"]
    print(f"undisturbed night: {n} rows, {t_clean:.1f} s (start-up included)")

    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", *score], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    published_before = night.published()["run_id"]
    committed, run = 0, None
    while proc.poll() is None:
        runs = night.runs_with_files() - {published_before}
        run = next(iter(runs), None)
        committed = _committed(night, run) if run else 0
        if committed >= args.kill_at * n:
            break
        time.sleep(0.1)
    if proc.poll() is not None:
        raise SystemExit("the run ended before it could be killed: raise --images or lower --kill-at")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    t_killed = time.time() - t0
    committed = _committed(night, run)
    print(f"killed run {run} after {t_killed:.1f} s with {committed} of {n} rows committed "
          f"({100 * committed / n:.0f} %); the published night is still run {night.published()['run_id']}")

    log, t_rerun = _job(env, *score)
    marker = night.published()
    print(f"rerun: {marker['resumed_rows']} rows resumed from run(s) {', '.join(marker['resumed_from'])}, "
          f"{marker['rows'] - marker['resumed_rows']} scored, {marker['rows']} published, {t_rerun:.1f} s")
    import pyarrow.dataset as pads
    ids = pads.dataset(os.path.join(night.uri, nights.SCORES_FILE)).to_table(columns=["image_id"])["image_id"]
    print(f"published rows {len(ids)}, distinct {len(set(ids.to_pylist()))} (lost {n - len(set(ids.to_pylist()))}, "
          f"twice {len(ids) - len(set(ids.to_pylist()))})")
    print(f"wall: killed run + rerun {t_killed + t_rerun:.1f} s against the undisturbed {t_clean:.1f} s "
          f"(ratio {(t_killed + t_rerun) / t_clean:.2f}); rerun alone {t_rerun / t_clean:.2f} of an undisturbed night")
    return 0


if __name__ == "__main__":
    sys.exit(main())
