"""python -m jobs.bench.operations [--epochs 2] [--steps 5] [--size 64]: the four everyday operations (issue 25),
each through its command line (`anople <verb> --json`, in this process), on generated products with the tiny
random-init backbone in a throwaway local store. A benchmark: prints four tables, asserts nothing.

1. add-product, leave one product out: per product, a model fit on the others with the product added without
   retraining, beside a full retrain on every product and a bank-only model (no prompts), on its test split.
2. feedback: a night whose tile camera moved; the inspectors call its most anomalous half normal (and two test
   defects defect): before and after, the labelled and the unlabelled half's alarms, the threshold, the bank, and
   recall on the test split's defects.
3. threshold: sensitivities and a value, each the threshold and what it flags on the last night.
4. drift: a normal night, a night whose tile camera moved 6 px, a night whose washer light dropped to 60 %.

Random weights: the figures show the operations work end to end, not what they achieve with CLIP's weights.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

TINY = "anople-tiny-vit"
PRODUCTS = ("tile", "washer", "fabric")


def _anople(*argv) -> dict:
    """`anople <argv> --json` in this process -> its summary (exit code included); stderr kept quiet."""
    from jobs import anople
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = anople.main([str(a) for a in argv] + ["--json"])
    lines = out.getvalue().strip().splitlines()
    s = json.loads(lines[-1]) if lines else {}
    if code not in (0, 4):
        raise SystemExit(f"anople {' '.join(map(str, argv))} exited {code}: {s.get('error')}\n{err.getvalue()[-3000:]}")
    return s


def _night(src: str, product: str, dest: str, shift: int = 0, light: float = 1.0) -> str:
    from PIL import Image
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(f"{src}/{product}/test/good")):
        img = np.asarray(Image.open(f"{src}/{product}/test/good/{name}").convert("RGB")).astype(np.float32)
        img = np.clip(np.roll(img, shift, axis=1) * light, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(f"{dest}/{product}-{name}")
    return dest


def _train(d, arch, epochs, steps, *extra):
    t0 = time.time()
    s = _anople("train", "--deployment", d, "--archive", arch, "--shots", 2, "--backbone", TINY, "--weights", "random",
                "--epochs", epochs, "--steps-per-epoch", steps, *extra)
    _anople("promote", "--deployment", d, "--from-alias", "candidate", "--to", "production", "--force")
    return s, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.operations", description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="anople-ops-bench-")
    os.environ.update({"ANOPLE_ROOT": f"{tmp}/root", "ANOPLE_MODEL_CACHE": f"{tmp}/cache"})
    for k in ("MLFLOW_TRACKING_URI", "ANOPLE_ARTIFACT_ROOT", "RAY_ADDRESS"):
        os.environ.pop(k, None)
    from pipeline.cluster import init_ray
    from pipeline.nightly.scorer import Scorer
    from pipeline.sources.synthetic import make_mvtec_folder
    init_ray()
    src = make_mvtec_folder(f"{tmp}/src", products=PRODUCTS, n_train=10, n_test_good=12, n_test_defect=2,
                            size=args.size, seed=5)
    print(f"generated {len(PRODUCTS)} products, 10 train normals, 12 test normals and 6 test defects each, "
          f"{args.size} px; tiny random-init backbone; fits of {args.epochs} epochs x {args.steps} steps; root {tmp}")

    # 1. add-product, leave one product out ----------------------------------------------------------------------
    full_arch = f"{tmp}/archive-full"
    _anople("ingest", src, "--archive", full_arch, "--deployment", "full", "--date", "2026-11-01")
    _anople("ingest", src, "--archive", full_arch, "--deployment", "bank", "--date", "2026-11-01")
    _, full_s = _train("full", full_arch, args.epochs, args.steps)
    full = _anople("evaluate", "--deployment", "full", "--archive", full_arch, "--model-alias", "production")
    _, bank_s = _train("bank", full_arch, args.epochs, args.steps, "--prompt-mode", "none")
    bank = _anople("evaluate", "--deployment", "bank", "--archive", full_arch, "--model-alias", "production")
    rows = []
    for p in PRODUCTS:
        d, arch = f"lopo-{p}", f"{tmp}/archive-lopo-{p}"
        others = [q for q in PRODUCTS if q != p]
        # MVTec layouts of the other products and of the one product, each a folder of its own
        shutil.copytree(f"{src}/{p}", f"{tmp}/only-{p}/{p}", dirs_exist_ok=True)
        for q in others:
            shutil.copytree(f"{src}/{q}", f"{tmp}/others-{p}/{q}", dirs_exist_ok=True)
        _anople("ingest", f"{tmp}/others-{p}", "--archive", arch, "--deployment", d, "--date", "2026-11-01")
        _, fit_s = _train(d, arch, args.epochs, args.steps)
        _anople("ingest", f"{tmp}/only-{p}", "--archive", arch, "--deployment", d, "--date", "2026-11-02")
        t0 = time.time()
        added = _anople("add-product", "--deployment", d, "--archive", arch, "--products", p, "--shots", 2)
        add_s = time.time() - t0
        ev = _anople("evaluate", "--deployment", d, "--archive", arch)
        rows.append((p, ev["per_product"][p], full["per_product"][p], bank["per_product"][p], added["seconds"], add_s,
                     fit_s))
    print("\n1. add-product, leave one product out (I-AUROC / P-AUROC %, the product's test split; seconds)")
    print(f"{'product':<10}{'added, no retraining':>24}{'full retrain':>18}{'bank only':>16}"
          f"{'add-product s':>16}{'(command s)':>13}{'fit of the rest s':>19}")
    for p, a, f, b, secs, cmd_s, fit_s in rows:
        cell = lambda r: f"{100 * r['image_auroc']:.1f} / {100 * r['pixel_auroc']:.1f}"  # noqa: E731
        print(f"{p:<10}{cell(a):>24}{cell(f):>18}{cell(b):>16}{secs:>16.1f}{cmd_s:>13.1f}{fit_s:>19.1f}")
    print(f"(full retrain {full_s:.1f} s, bank-only fit {bank_s:.1f} s, each with evaluate-free promote)")

    # 4 (its first night is 2's and 3's too). drift -------------------------------------------------------------
    out = f"{tmp}/out"
    nights = {"2026-11-03": {}, "2026-11-04": {"tile": {"shift": 6}}, "2026-11-05": {"washer": {"light": 0.6}}}
    drift_rows = []
    for date, change in nights.items():
        for p in PRODUCTS:
            folder = _night(src, p, f"{tmp}/nights/{date}/{p}", **change.get(p, {}))
            _anople("ingest", folder, "--archive", full_arch, "--deployment", "full", "--date", date, "--product", p)
        s = _anople("score", "--deployment", "full", "--archive", full_arch, "--date", date, "--output", out,
                    "--fail-on-drift")
        drift_rows.append((date, change, s))

    # 3. threshold on the night of the moved tile camera --------------------------------------------------------
    # (the last scored night is 2026-11-05; the tile rows of every night are alike there, so use the one it finds)
    thr_rows = []
    for how in (("--sensitivity", 0.01), ("--sensitivity", 0.1), ("--sensitivity", 0.25), ("--sensitivity", 0.5),
                ("--value", 0.2)):
        t = _anople("threshold", "--deployment", "full", "--product", "tile", *how)
        thr_rows.append((how, t))

    # 2. feedback on the moved-camera night --------------------------------------------------------------------
    from pipeline import registry
    from pipeline.sources import archive
    from pipeline.sources.images import decode_image, to_model_input
    prod = registry.get_version("full", alias="production")
    part = archive.Partition(full_arch, "full", "2026-11-04")
    ids = part.image_ids(archive.Rows(products=("tile",)))
    images = part.read_images(ids)
    test = archive.read_table(full_arch, "full", "2026-11-01", archive.Rows(split="test", products=("tile",)),
                              columns=["image_id", "image", "label"]).to_pylist()
    defects = [r for r in test if r["label"] == 1]

    def measure(mv):
        sc = Scorer.load(registry.artifact_uri(mv), ["tile"], expected_sha256=registry.artifact_sha256(mv))
        size = sc.model.image_size
        x = np.stack([to_model_input(decode_image(images[i]), size) for i in ids])
        s = sc.score(x, ["tile"] * len(ids))[0]
        dx = np.stack([to_model_input(decode_image(r["image"]), size) for r in defects])
        ds = sc.score(dx, ["tile"] * len(defects))[0]
        return s, sc.thresholds["tile"], float((ds > sc.thresholds["tile"]).mean()), sc.banks["tile"].n_patches
    s0, t0_, rec0, bank0 = measure(prod)
    order = [ids[i] for i in np.argsort(-s0)]
    labelled, unlabelled = order[:len(order) // 2], order[len(order) // 2:]
    labels = f"{tmp}/verdicts.csv"
    with open(labels, "w") as f:
        f.write("image_id,verdict,date,note\n")
        f.writelines(f"{i},normal,2026-11-04,camera moved: not a defect\n" for i in labelled)
        f.writelines(f"{r['image_id']},defect,2026-11-01,\n" for r in defects[:2])
    fb = _anople("feedback", "--deployment", "full", "--archive", full_arch, "--labels", labels)
    s1, t1, rec1, bank1 = measure(registry.get_version("full", version=fb["version"]))
    pos = {i: k for k, i in enumerate(ids)}
    lab, unl = [pos[i] for i in labelled], [pos[i] for i in unlabelled]

    print("\n2. feedback: tile, the night its camera moved 6 px; the most anomalous half called normal")
    print(f"{'':<10}{'threshold':>11}{'bank':>7}{'labelled half: mean / flagged':>32}{'other half: mean / flagged':>29}"
          f"{'test-defect recall':>20}")
    for name, s, t, rec, bank in (("before", s0, t0_, rec0, bank0), ("after", s1, t1, rec1, bank1)):
        print(f"{name:<10}{t:>11.4f}{bank:>7}{f'{s[lab].mean():.4f} / {int((s[lab] > t).sum())} of {len(lab)}':>32}"
              f"{f'{s[unl].mean():.4f} / {int((s[unl] > t).sum())} of {len(unl)}':>29}"
              f"{f'{100 * rec:.0f} % of {len(defects)}':>20}")
    print(f"feedback took {fb['seconds']:.1f} s; counts {fb['counts']}; version {fb['version']} from "
          f"{fb['parent_version']}")

    print("\n3. threshold: tile's operating point, what each flags on the last scored night "
          f"({thr_rows[0][1]['last_night']['date']}, {thr_rows[0][1]['last_night']['scored']} tile rows)")
    print(f"{'command':<22}{'threshold':>11}{'fit threshold':>15}{'flags old -> new':>18}  version")
    for how, t in thr_rows:
        flags = f"{t['last_night']['flags']['old']} -> {t['last_night']['flags']['new']}"
        print(f"{' '.join(map(str, how)):<22}{t['new']['threshold']:>11.4f}{t['old']['threshold']:>15.4f}"
              f"{flags:>18}  {t['version']}")

    print("\n4. drift: per night and product, KS on presumed-normal scores vs calibration / trailing nights "
          "(flag: p < 0.001 and D >= 0.3; alarm rate > 0.5)")
    print(f"{'night':<12}{'change':<18}{'product':<9}{'D cal':>7}{'p cal':>10}{'D trail':>9}{'p trail':>10}"
          f"{'alarms':>8}{'flagged':>9}")
    for date, change, s in drift_rows:
        for p, r in sorted(s["drift"]["products"].items()):
            t = {(x["test"], x["baseline"]): x for x in r["tests"]}
            c, tr, a = t[("ks_2samp", "calibration")], t[("ks_2samp", "trailing")], t[("alarm_rate", "calibration")]
            f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
            what = ", ".join(f"{k} {v}" for k, v in change.get(p, {}).items()) or "-"
            print(f"{date:<12}{what:<18}{p:<9}{f(c['statistic'], '.3f'):>7}{f(c['p_value'], '.2g'):>10}"
                  f"{f(tr['statistic'], '.3f'):>9}{f(tr['p_value'], '.2g'):>10}{f(a['statistic'], '.2f'):>8}"
                  f"{'DRIFT' if r['flagged'] else '-':>9}")
        print(f"{'':<12}exit code {s['exit_code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
