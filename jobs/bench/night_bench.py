"""python -m jobs.bench.night_bench: a night at archive scale through the real `jobs.score`, measured (a benchmark;
asserts nothing).

Builds a deployment (synthetic products, a model fitted with a short budget and promoted with --force),
archives a night of N images of a chosen size and format (JPEG 1024 px is what plants keep), then runs
`python -m jobs.score` as its own process, as a scheduler would, sampling the resident memory of that
process tree (driver, raylet, decode tasks and scoring actors): RSS and PSS. Prints:
  - start-up seconds (job start -> first scored row) and steady-state images/s (the rows' own `scored_at`
    stamps between the 10th and 90th percentile, so start-up and the tail are excluded), and the rate in
    each tenth of the night (flat when nothing builds up);
  - per-stage times of one process on a sample of the night: read, decode, forward, bank search, decoder,
    fusion + blur, heatmap encode, heatmap write; the slowest names the bottleneck;
  - the bare open_clip visual forward, timed in this process right before and right after each night (the
    machine's speed drifts between minutes), and each night's steady state / the mean of the two;
  - peak RSS (and PSS) of the job at N and at --scale x N images, and their ratio (memory must stay flat);
  - the cores each kind of process kept busy in the steady state, and RSS by process at the peak;
  - with --heap-ab K, the first night scored K more times under each heap policy (pipeline.heap), interleaved;
  - with --decode-ab K, the first night scored K more times with JPEGs decoded by the CPU tasks and by the
    scoring actor (jobs.score --decode cpu / device: nvJPEG on a GPU), interleaved.
The backbone defaults to random init (no hub here), and the output says so.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from pipeline.model import DEFAULT_BACKBONE
from pipeline.sources.decoding import DECODE_CHOICES, decode_where

DEPLOYMENT, REF_DATE = "bench", "2026-11-21"


def _proc_kb(pid: str, path: str, keys: tuple[str, ...]) -> list[int]:
    with open(f"/proc/{pid}/{path}") as f:
        found = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split(":")[0] in keys}
    return [found.get(k, 0) for k in keys]


def _process_name(pid: str) -> str:
    """What a process of the job is doing: Ray titles its workers by their task or actor
    (ray::MapWorker(MapBatches(ScoreActor)).submit, ray::ReadParquet->MapBatches(decode_batch), ray::IDLE;
    the method is dropped); other processes by executable (raylet, gcs_server) or, for Python, by module or
    script (the driver: jobs.score)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        title = argv[0].split()[0]
        return title[:title.rindex(")") + 1] if ")" in title else title.split(".")[0]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    exe = os.path.basename(argv[0])
    script = [a for a in argv[1:] if not a.startswith("-")]
    return os.path.basename(script[0]) if exe.startswith("python") and script else exe


def tree_memory_mb(root_pid: int, cpu: dict | None = None) -> dict[str, float]:
    """Memory of root_pid and of it with every descendant, in MB, from /proc (Linux): RSS (each process's
    resident pages: a shared page, e.g. of Ray's object store in /dev/shm, counts once per process mapping it)
    and PSS (shared pages split between their processes: the tree's sum is what it really holds).
    With `cpu` ({"pids": {}, "by_name": {}}), also adds the CPU seconds each process of the tree used since the
    last call to its current name (a worker's task changes; idle time is charged to its last task), and keeps
    the tree's RSS by process name in cpu["rss_by_name"]."""
    children: dict[int, list[int]] = {}
    mem: dict[int, tuple[float, float]] = {}
    ticks: dict[int, float] = {}
    hz = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid = int(fields[1])
            rss, = _proc_kb(d, "status", ("VmRSS",))
            pss, = _proc_kb(d, "smaps_rollup", ("Pss",)) if rss else (0,)
        except (OSError, ValueError, IndexError):
            continue  # a process that ended while we looked
        children.setdefault(ppid, []).append(int(d))
        mem[int(d)] = (rss / 1024, pss / 1024)
        ticks[int(d)] = (int(fields[11]) + int(fields[12])) / hz  # utime + stime
    tree, todo, by_name = [0.0, 0.0], [root_pid], {}
    while todo:
        pid = todo.pop()
        rss, pss = mem.get(pid, (0.0, 0.0))
        tree[0] += rss
        tree[1] += pss
        todo += children.get(pid, [])
        if cpu is not None and pid in ticks:
            try:
                name = _process_name(str(pid))
            except OSError:
                continue
            seen = cpu["pids"].setdefault(pid, [name, 0.0])
            if name != "ray::IDLE":
                seen[0] = name
            cpu["by_name"][seen[0]] = cpu["by_name"].get(seen[0], 0.0) + ticks[pid] - seen[1]
            seen[1] = ticks[pid]
            by_name[seen[0]] = by_name.get(seen[0], 0.0) + rss
    if cpu is not None:
        cpu["rss_by_name"] = by_name
    own = mem.get(root_pid, (0.0, 0.0))
    return {"driver": own[0], "tree": tree[0], "driver_pss": own[1], "tree_pss": tree[1]}


SAMPLE_SECONDS = 2.0  # reading every process's smaps_rollup (PSS) costs CPU: 0.07-0.09 of a core at 2 s (printed);
                     # four times that at the 0.5 s it sampled at before, taken from the job it measured


def run_job(argv: list[str], env: dict) -> dict:
    """Run `python -m <argv>` to completion, sampling its tree's memory and each process's CPU every
    SAMPLE_SECONDS (`cpu_samples`: (time, CPU seconds by process name so far); `peak_by_name`: RSS by process
    name when the tree's RSS peaked; `sampler_cores`: what the sampling itself cost)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak = {"driver": 0.0, "tree": 0.0, "driver_pss": 0.0, "tree_pss": 0.0}
    cpu: dict = {"pids": {}, "by_name": {}}
    samples: list = []
    peak_by_name: dict = {}
    sampler = [0.0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            c0 = time.thread_time()
            mem = tree_memory_mb(proc.pid, cpu)
            if mem["tree"] > peak["tree"]:
                peak_by_name.clear()
                peak_by_name.update(cpu["rss_by_name"])
            for k, v in mem.items():
                peak[k] = max(peak[k], v)
            samples.append((time.time(), dict(cpu["by_name"])))
            sampler[0] += time.thread_time() - c0
            done.wait(SAMPLE_SECONDS)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.communicate()[0]
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"night_bench: {' '.join(argv[:1])} failed ({proc.returncode}):\n{out[-4000:]}")
    seconds = time.time() - t0
    return {"seconds": seconds, "start": t0, "output": out, "cpu_samples": samples, "peak_by_name": peak_by_name,
            "sampler_cores": sampler[0] / seconds,
            **{f"peak_{k}_mb": v for k, v in peak.items()}}


def cores_used(samples: list, lo: float, hi: float) -> dict[str, float]:
    """Cores each kind of process kept busy between epoch seconds lo and hi (the steady state): the change of
    its CPU seconds between the samples nearest lo and hi, over the time between them."""
    times = np.array([t for t, _ in samples])
    if len(times) < 2:
        return {}
    a, b = samples[int(np.abs(times - lo).argmin())], samples[int(np.abs(times - hi).argmin())]
    if b[0] <= a[0]:
        return {}
    return {k: (v - a[1].get(k, 0.0)) / (b[0] - a[0]) for k, v in b[1].items() if v - a[1].get(k, 0.0) > 0}


def encoded_images(n_distinct: int, size: int, fmt: str, products: list[str], seed: int = 0) -> list[tuple[str, bytes]]:
    """A few distinct product images (with defects in some), encoded once; the night cycles through them."""
    from PIL import Image

    from pipeline.sources.synthetic import add_defect, normal_image
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_distinct):
        p = products[i % len(products)]
        img = normal_image(p, size, rng)
        if i % 5 == 4:
            img, _ = add_defect(img, ("scratch", "stain", "hole")[i % 3], rng)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", **({"quality": 90} if fmt == "jpeg" else {}))
        out.append((p, buf.getvalue()))
    return out


def write_night(archive_uri: str, date: str, n: int, images: list[tuple[str, bytes]]) -> None:
    """n archive rows of the night (unique image_ids), through the archive's own shard writer."""
    import datetime as dt

    from pipeline.sources import archive
    w = archive.ShardWriter(archive_uri, DEPLOYMENT, date)
    at = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
    for i in range(n):
        p, data = images[i % len(images)]
        w.write({"image_id": f"{p}/{i:08d}", "product": p, "captured_at": at, "image": data, "split": "test",
                 "label": None, "mask": None, "defect": None, "source_uri": None})
    w.close()


def steady_state(scores_uri: str, job_start: float) -> dict:
    """From the published rows' scored_at: start-up (job start -> first row) and the rate between the 10th
    and 90th percentile of the stamps (the rows done after the first and up to the second, over the time
    between them)."""
    import pyarrow.parquet as pq

    from pipeline import storage
    fs, path = storage.arrow_filesystem(scores_uri)
    t = pq.read_table(path, filesystem=fs, columns=["scored_at", "status"])
    at = np.sort(t["scored_at"].cast("int64").to_numpy() / 1e6)  # epoch seconds
    lo, hi = np.percentile(at, [10, 90])
    # rows done in (lo, hi]: those stamped lo were done when the window opened (a batch's rows share a stamp,
    # so counting them overstated a short night's rate by a whole batch: 192 rows for 160 on 200 images)
    inside = ((at > lo) & (at <= hi)).sum()
    ok = sum(1 for s in t["status"].to_pylist() if s == "ok")
    # the rate in each tenth of the night's time (first to last stamp; a batch's rows share its stamp, so the
    # first batch, done before the first stamp, is left out): flat when nothing builds up. Needs >= 20 batches.
    stamps, counts = np.unique(at, return_counts=True)
    tenths = None
    if len(stamps) >= 20:
        edges = np.linspace(stamps[0], stamps[-1], 11)
        window = np.clip(np.searchsorted(edges, stamps[1:], side="left") - 1, 0, 9)  # (e_k, e_k+1] -> k
        tenths = [float(counts[1:][window == k].sum() / (edges[k + 1] - edges[k])) for k in range(10)]
    return {"rows": len(at), "ok": ok, "startup_s": float(at[0] - job_start), "steady_window": (float(lo), float(hi)),
            "steady_images_per_s": float(inside / (hi - lo)) if hi > lo else float("nan"), "rate_by_tenth": tenths}


class BareForward:
    """The bare open_clip visual forward of the deployment's backbone, timed on demand in this process (the
    job is its own process tree): measured right before and right after each night, so the ratio compares
    figures from the same minutes of a machine whose speed drifts (+-20% here between runs)."""

    def __init__(self, deployment: str, images: list[tuple[str, bytes]], sample: int, batch: int):
        import torch

        from pipeline import registry
        from pipeline.model.scoring import model_input
        from pipeline.nightly.scorer import Scorer
        from pipeline.sources.images import decode_scaled, to_model_pixels

        mv = registry.get_version(deployment, alias="production")
        self.scorer = Scorer.load(registry.materialize(registry.model_source(mv)),
                                  expected_sha256=registry.artifact_sha256(mv))
        S = self.scorer.model.image_size
        px = np.stack([to_model_pixels(decode_scaled(data, S)[0], S) for _, data in images])
        self.x = model_input(px[np.arange(sample) % len(px)], self.scorer.device)  # [sample, 3, S, S]
        self.batch, self.torch = batch, torch

    def rate(self) -> float:
        torch, clip, dev = self.torch, self.scorer.model.clip, self.scorer.device
        sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
            clip.encode_image(self.x[:self.batch])  # warm-up, not timed
            sync()
            t0 = time.perf_counter()
            for i in range(0, len(self.x), self.batch):
                clip.encode_image(self.x[i:i + self.batch])
            sync()
        return len(self.x) / (time.perf_counter() - t0)


def stage_profile(deployment: str, archive_uri: str, date: str, sample: int, batch: int, heatmap_side: int | None,
                  full_res: bool, workdir: str) -> dict:
    """Seconds per image of each stage of the scoring path, one process, on `sample` rows of the night; heatmaps
    stored as the job stores them (long side `heatmap_side`, default the model's input size, or full_res).
    Decode is timed both ways: "decode" as the CPU tasks do it (PIL, reduced-size JPEG decode), "device decode"
    as the scoring actor does it with --decode device (device_decode: nvJPEG on a GPU, in batches)."""
    import torch

    from pipeline import registry, storage
    from pipeline.model.scoring import component_maps, fuse, model_input
    from pipeline.nightly.scorer import Scorer
    from pipeline.sources import archive
    from pipeline.sources.images import decode_scaled, encode_heatmap, heatmap_scale, to_model_pixels

    mv = registry.get_version(deployment, alias="production")
    scorer = Scorer.load(registry.materialize(registry.model_source(mv)),
                         expected_sha256=registry.artifact_sha256(mv))
    S, model = scorer.model.image_size, scorer.model
    side = None if full_res else heatmap_side or S
    sync = torch.cuda.synchronize if scorer.device.startswith("cuda") else (lambda: None)
    t = {}
    t0 = time.perf_counter()
    table = archive.read_table(archive_uri, deployment, date, columns=["image_id", "product", "image"]).slice(0, sample)
    rows = table.to_pylist()
    t["read"] = (time.perf_counter() - t0) / len(rows)
    t0 = time.perf_counter()
    decoded = [decode_scaled(r["image"], S) for r in rows]
    pixels = np.stack([to_model_pixels(rgb, S) for rgb, _ in decoded])  # uint8, as decode tasks send
    t["decode"] = (time.perf_counter() - t0) / len(rows)
    t["device decode"] = device_decode_seconds([r["image"] for r in rows], S, scorer.device, batch, sync)
    products = [r["product"] for r in rows]
    parts = {k: 0.0 for k in ("forward", "bank search", "decoder", "fusion + blur")}
    maps_all, scores_all = [], []
    bare = 0.0
    scorer.score(pixels[:batch], products[:batch])  # warm-up (kernels, allocator, index), not timed
    for i in range(0, len(rows), batch):
        x, names = pixels[i:i + batch], products[i:i + batch]
        sync()
        t0 = time.perf_counter()
        enc = scorer.encode(x)
        sync()
        t1 = time.perf_counter()
        bank = component_maps(model, enc, names, scorer.banks, scorer.text, kinds=("bank",))
        sync()
        t2 = time.perf_counter()
        text = component_maps(model, enc, names, scorer.banks, scorer.text, kinds=("text",)) if model.decoder is not None else {}
        sync()
        t3 = time.perf_counter()
        s, m = fuse(model.cfg, {**bank, **text}, names, scorer.scales)
        t4 = time.perf_counter()
        with torch.inference_mode():  # the bare open_clip visual forward on the same pixels
            xt = model_input(x, scorer.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=scorer.device.startswith("cuda")):
                model.clip.encode_image(xt)
        sync()
        t5 = time.perf_counter()
        for k, dt_ in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k] += dt_
        bare += t5 - t4
        maps_all.append(m)
        scores_all.append(s)
    t.update({k: v / len(rows) for k, v in parts.items()})
    maps = np.concatenate(maps_all)
    t0 = time.perf_counter()
    pngs = [encode_heatmap(maps[i], *decoded[i][1], heatmap_scale(scorer.thresholds[products[i]], maps[i]), side)
            for i in range(len(rows))]
    t["heatmap encode"] = (time.perf_counter() - t0) / len(rows)
    t0 = time.perf_counter()
    for i, png in enumerate(pngs):
        storage.write_bytes(os.path.join(workdir, f"{i}.png"), png)
    t["heatmap write"] = (time.perf_counter() - t0) / len(rows)
    return {"per_image_s": t, "bare_forward_images_per_s": len(rows) / bare, "device": scorer.device,
            "heatmap_kb": float(np.mean([len(p) for p in pngs]) / 1024), "image_size": S,
            "source_size": list(decoded[0][1])}


def device_decode_seconds(data: list[bytes], size: int, device: str, batch: int, sync) -> float:
    """Seconds per image of the scoring actor's own decode (device_decode) of these JPEGs, in batches, after a
    warm-up batch; nan when none of them is a JPEG the actor would decode."""
    from pipeline.sources.device_decode import DeviceDecoder
    from pipeline.sources.images import device_jpeg

    mine = [(d, info) for d in data if (info := device_jpeg(d)) is not None]
    if not mine:
        return float("nan")
    dec = DeviceDecoder(size, device)

    def run(part):
        dec([d for d, _ in part], [o for _, (o, _) in part], [hw for _, (_, hw) in part])

    run(mine[:batch])  # warm-up (nvJPEG handles, kernels), not timed
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(mine), batch):
        run(mine[i:i + batch])
    sync()
    return (time.perf_counter() - t0) / len(mine)


def actor_profile(backbone: str, weights: str, size: int, n_products: int, batch: int, batches: int,
                  workdir: str) -> dict:
    """The night's stages in one process, without Ray, jobs or a registry (seconds a device's lease can spare):
    a deployment fitted in process (no prompt training), then per image, on `batches` batches of `batch` JPEGs:
    the CPU task's decode (decoding.decode_batch), the bare visual forward, Scorer.score, the scoring actor's
    whole call on a decoded batch (ScoreActor.__call__: host work around the scorer included), the same with
    the JPEGs decoded on the actor (--decode device), and the heatmap writer (batch.write_heatmaps). What one
    process does per image, so: cores / decode = what the CPU tasks can feed, 1 / actor = what one actor takes."""
    import torch

    from pipeline.fitting.shots import ProductShots, fit_products
    from pipeline.fitting.weights import build_model
    from pipeline.model.config import AnoPLeConfig
    from pipeline.model.scoring import model_input
    from pipeline.nightly.score_table import RunInfo
    from pipeline.nightly.scorer import Scorer, pick_device
    from pipeline.nightly.stages import HeatmapTarget, ScoreActor, write_heatmaps
    from pipeline.sources.decoding import decode_batch
    from pipeline.sources.synthetic import product_names

    device = pick_device()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    products = list(product_names(n_products))
    images = encoded_images(8 * n_products, size, "jpeg", products)
    model = build_model(backbone, weights, 0, AnoPLeConfig(), device)
    data = {}
    for p in products:
        mine = {f"{p}/{i}": d for i, (q, d) in enumerate(images) if q == p}
        ids = sorted(mine)
        data[p] = ProductShots(images=mine, shots=ids[:1], heldout=ids[1:4])
    scorer = Scorer.from_fits(model, fit_products(model, data, products, device), device)
    actor = ScoreActor.around(scorer, RunInfo("bench", "anople-bench", "0", "profile"))
    n = batch * batches
    rows = {"image_id": np.array([f"{images[i % len(images)][0]}/{i:08d}" for i in range(n)], dtype=object),
            "product": np.array([images[i % len(images)][0] for i in range(n)], dtype=object),
            "image": np.array([images[i % len(images)][1] for i in range(n)], dtype=object),
            "source_uri": np.full(n, None, dtype=object)}
    parts = [{k: v[i:i + batch] for k, v in rows.items()} for i in range(0, n, batch)]
    S, t = model.image_size, {}

    def timed(name, fn, items):
        fn(items[0])  # warm-up: kernels, allocator, nvJPEG handles
        sync()
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        sync()
        t[name] = (time.perf_counter() - t0) / n
        return out

    decoded = timed("decode (CPU task)", lambda b: decode_batch(b, S, False), parts)
    on_device = timed("header check (CPU task, --decode device)", lambda b: decode_batch(b, S, False, on_device=True),
                      parts)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        xs = [model_input(d["pixels"], device) for d in decoded]
        timed("bare visual forward", lambda x: model.clip.encode_image(x), xs)
    del xs
    timed("Scorer.score", lambda d: scorer.score(d["pixels"], [str(p) for p in d["product"]]), decoded)
    scored = timed("actor call (decoded batch)", actor, decoded)
    timed("actor call (--decode device)", actor, on_device)
    target = HeatmapTarget(workdir, S)
    timed("heatmap writer (CPU task)", lambda b: write_heatmaps(dict(b), target), scored)
    return {"device": device, "per_image_s": t, "batch": batch, "images": n}


def busiest(cores: dict[str, float], top: int = 4) -> str:
    """'cores busy N: the top processes' of a cores_used() result, for one line."""
    big = sorted(cores.items(), key=lambda kv: -kv[1])
    return f"cores busy {sum(cores.values()):.1f}: " + ", ".join(f"{k} {v:.2f}" for k, v in big[:top])


def gpu_in_windows(log: str, windows: list[tuple[str, tuple[float, float]]]) -> dict[str, tuple[float, float, int]]:
    """Mean GPU utilisation (%) and memory (MiB) of the samples of `log` (lines `epoch_seconds,util,mem`) inside
    each named (start, end) window of epoch seconds; windows without a sample are left out."""
    rows = []
    with open(log) as f:
        for line in f:
            fields = line.split(",")
            try:
                if len(fields) >= 3:
                    rows.append([float(x) for x in fields[:3]])
            except ValueError:
                pass  # an error message in place of figures: no sample
    if not rows:
        return {}
    at = np.array(rows)
    out = {}
    for name, (lo, hi) in windows:
        inside = at[(at[:, 0] >= lo) & (at[:, 0] <= hi)]
        if len(inside):
            out[name] = (float(inside[:, 1].mean()), float(inside[:, 2].mean()), len(inside))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.bench.night_bench", description=__doc__.split("\n\n")[1])
    ap.add_argument("--images", type=int, default=200, help="images in the night")
    ap.add_argument("--scale", type=int, default=5, help="also run a night this many times larger (RSS ratio); 0: no")
    ap.add_argument("--size", type=int, default=1024, help="image side, pixels")
    ap.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    ap.add_argument("--products", type=int, default=3)
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--weights", default="random")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--heatmap-side", type=int, default=None, help="passed to jobs.score (default: its own, the "
                                                                  "model's input size)")
    ap.add_argument("--heatmap-full-res", action="store_true", help="passed to jobs.score: the old full-size heatmaps")
    ap.add_argument("--sample", type=int, default=64, help="images for the per-stage profile")
    ap.add_argument("--root", default="", help="working root (default: a temporary folder)")
    ap.add_argument("--heap-ab", type=int, default=0, help="then score the first night this many times more under "
                                                            "each heap policy, interleaved (pipeline.heap)")
    ap.add_argument("--decode", choices=DECODE_CHOICES, default="auto", help="passed to jobs.score")
    ap.add_argument("--decode-ab", type=int, default=0, help="then score the first night this many times more with "
                                                               "--decode cpu and device each, interleaved")
    ap.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                    help="then score the first night once more with these extra jobs.score flags (e.g. "
                         "'--decode device', '--actors-per-shard 2'); repeatable")
    ap.add_argument("--gpu-log", default="", help="a log of `epoch_seconds,utilization %%,memory MiB` lines "
                                                  "(gpu-bench.sh samples nvidia-smi): GPU use in each night's steady state")
    ap.add_argument("--in-process", type=int, default=0, metavar="BATCHES",
                    help="only time the night's stages in this process (actor_profile) on this many batches: no "
                         "Ray, jobs or nights")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.in_process:
        if args.weights == "random":
            os.environ["HF_HUB_OFFLINE"] = "1"
            print("NOTE: RANDOM-INIT BACKBONE: timings are real, any score is meaningless.")
        with tempfile.TemporaryDirectory() as work:
            prof = actor_profile(args.backbone, args.weights, args.size, args.products, args.batch_size,
                                 args.in_process, work)
        cores = len(os.sched_getaffinity(0))
        print(f"in process on {prof['device']}: {prof['images']} JPEGs of {args.size} px, {args.backbone} "
              f"({args.weights}), batch {args.batch_size}; ms/image and what one process (or {cores} cores) does:")
        for k, v in prof["per_image_s"].items():
            cap = f"{cores / v:9.0f} images/s on {cores} cores" if "CPU task" in k else f"{1 / v:9.0f} images/s"
            print(f"    {k:<42}{1000 * v:8.3f}   {cap}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "in_process": prof}, f, indent=1)
        return 0
    root = os.path.abspath(args.root or tempfile.mkdtemp(prefix="anople-night-bench-"))
    env = {**os.environ, "ANOPLE_ROOT": root, "ANOPLE_PROGRESS_SECONDS": "3600"}
    if args.weights == "random":
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
        print("NOTE: RANDOM-INIT BACKBONE: timings are real, any score is meaningless.")
    os.environ["ANOPLE_ROOT"] = root
    from pipeline.sources.synthetic import make_mvtec_folder, product_names

    products = list(product_names(args.products))
    archive_uri, output = os.path.join(root, "archive"), os.path.join(root, "results")
    t0 = time.time()
    ref = make_mvtec_folder(os.path.join(root, "source"), tuple(products), n_train=4, n_test_good=0, n_test_defect=0,
                            size=min(args.size, 256), seed=0)
    for step in (["jobs.ingest", ref, "--archive", archive_uri, "--deployment", DEPLOYMENT, "--date", REF_DATE],
                 ["jobs.train", "--deployment", DEPLOYMENT, "--archive", archive_uri, "--shots", "1", "--backbone",
                  args.backbone, "--weights", args.weights, "--epochs", "1", "--steps-per-epoch", "1"],
                 ["jobs.promote", "--deployment", DEPLOYMENT, "--from-alias", "candidate", "--to", "production",
                  "--force"]):
        run_job(step, env)
    images = encoded_images(32, args.size, args.format, products)
    setup_s = time.time() - t0
    nights = [(args.images, "2026-11-22")] + ([(args.images * args.scale, "2026-11-23")] if args.scale > 1 else [])
    results = []
    # this process times the bare forward and the stages under the scoring actors' heap policy, so the ratio
    # is the pipeline's own overhead (the policy alone made Scorer.score ~1.35x faster here: pipeline.heap)
    from pipeline.heap import keep_large_blocks_on_heap
    keep_large_blocks_on_heap()
    bare = BareForward(DEPLOYMENT, images, args.sample, args.batch_size)
    from pipeline.nightly import nights as nights_mod

    def score(date: str, job_env: dict, decode: str = args.decode, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
        cmd = ["jobs.score", "--deployment", DEPLOYMENT, "--archive", archive_uri, "--date", date, "--output", output,
               "--batch-size", str(args.batch_size), "--decode", decode, *extra] + (["--heatmap-side", str(args.heatmap_side)] if args.heatmap_side else []) \
            + (["--heatmap-full-res"] if args.heatmap_full_res else [])
        job = run_job(cmd, job_env)
        return job, steady_state(nights_mod.Night(output, DEPLOYMENT, date).published()["scores"], job["start"])

    for n, date in nights:
        write_night(archive_uri, date, n, images)
        before = bare.rate()
        job, steady = score(date, env)
        results.append({"images": n, **steady, "job_s": job["seconds"],
                        "bare_before": before, "bare_after": bare.rate(),
                        "steady_cores": cores_used(job["cpu_samples"], *steady["steady_window"]),
                        "peak_by_name": job["peak_by_name"], "sampler_cores": job["sampler_cores"],
                        **{k: v for k, v in job.items() if k.startswith("peak_")}})
        r = results[-1]  # said now too: a run stopped later (a device's time limit) keeps this figure
        print(f"[{n} images, --decode {args.decode}: job {r['job_s']:.1f} s, start-up {r['startup_s']:.1f} s, steady "
              f"{r['steady_images_per_s']:.1f} images/s; bare forward {r['bare_before']:.1f} / {r['bare_after']:.1f}; "
              f"{busiest(r['steady_cores'])}]", flush=True)
    del bare
    # the heap policy's A/B on the first night, interleaved so both see the same minutes of a drifting machine
    ab: dict[str, list[float]] = {"keep": [], "default": []}
    for _ in range(args.heap_ab):
        for policy in ab:
            _, steady = score(nights[0][1], {**env, "ANOPLE_HEAP_POLICY": policy})
            ab[policy].append(steady["steady_images_per_s"])
    decode_ab: dict[str, list[float]] = {"cpu": [], "device": []}
    windows = [(f"{r['images']}-image night", r["steady_window"]) for r in results]
    for _ in range(args.decode_ab):
        for where in decode_ab:
            _, steady = score(nights[0][1], env, where)
            decode_ab[where].append(steady["steady_images_per_s"])
            print(f"[decode A/B, --decode {where}: start-up {steady['startup_s']:.1f} s, steady "
                  f"{steady['steady_images_per_s']:.1f} images/s]", flush=True)
            windows.append((f"decode A/B, {where}", steady["steady_window"]))
    variants: dict[str, dict] = {}
    for flags in args.variant:  # after the main night and the A/Bs: each once, on the first night
        job, steady = score(nights[0][1], env, extra=tuple(flags.split()))
        variants[flags] = {**steady, "steady_cores": cores_used(job["cpu_samples"], *steady["steady_window"])}
        windows.append((flags, steady["steady_window"]))
        print(f"[{flags}: start-up {steady['startup_s']:.1f} s, steady {steady['steady_images_per_s']:.1f} images/s; "
              f"{busiest(variants[flags]['steady_cores'])}]", flush=True)
    with tempfile.TemporaryDirectory() as work:
        prof = stage_profile(DEPLOYMENT, archive_uri, nights[0][1], args.sample, args.batch_size, args.heatmap_side,
                             args.heatmap_full_res, work)
    r0 = results[0]
    print()
    print(f"night: {args.images} {args.format.upper()} images of {args.size} px, {len(products)} products, "
          f"{args.backbone} ({args.weights}) on {prof['device']}, batch {args.batch_size}; setup {setup_s:.0f} s")
    for r in results:
        print(f"  {r['images']:>7} images: job {r['job_s']:7.1f} s, start-up {r['startup_s']:6.1f} s, steady state "
              f"{r['steady_images_per_s']:7.2f} images/s, peak RSS driver {r['peak_driver_mb']:6.0f} MB, "
              f"job tree {r['peak_tree_mb']:6.0f} MB (PSS {r['peak_tree_pss_mb']:6.0f} MB) ({r['ok']} ok of {r['rows']})")
        if r["rate_by_tenth"]:
            print(f"           images/s by tenth of the night: {' '.join(f'{x:.2f}' for x in r['rate_by_tenth'])}")
        busy = sorted(r["steady_cores"].items(), key=lambda kv: -kv[1])
        print(f"           cores busy in the steady state, by process ({len(os.sched_getaffinity(0))} here): "
              f"{sum(v for _, v in busy):.2f} = " + ", ".join(f"{k} {v:.2f}" for k, v in busy if v >= 0.005)
              + f"; this benchmark's sampling: {r['sampler_cores']:.3f}")
        big = sorted(r["peak_by_name"].items(), key=lambda kv: -kv[1])
        print("           RSS at the peak, by process (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in big[:6]))
    print(f"  per-stage, one process, {args.sample} images (ms/image; heatmaps {prof['heatmap_kb']:.0f} KB each):")
    stages = prof["per_image_s"]
    for k, v in stages.items():
        print(f"    {k:<16}{1000 * v:9.2f}")
    where = decode_where(args.decode, prof["device"].startswith("cuda"))
    unused = "decode" if where == "device" else "device decode"  # shown, not counted as the bottleneck
    slowest = max((k for k in stages if k != unused and np.isfinite(stages[k])), key=stages.get)
    print(f"  bottleneck on one process: {slowest} ({1000 * stages[slowest]:.1f} ms/image)")
    print(f"  bare open_clip visual forward, in the profile: {prof['bare_forward_images_per_s']:.2f} images/s")
    own = 1 / stages["forward"]  # the model's own forward: the bare one plus the prompt and prefix tokens
    for r in results:  # each night's, against the bare forward timed right before and after it
        around = (r["bare_before"] + r["bare_after"]) / 2
        print(f"  ratio steady state / bare forward, {r['images']} images: {r['steady_images_per_s'] / around:.2f} "
              f"(target >= 0.75 on a GPU, 0.87 on a CPU; bare forward {r['bare_before']:.2f} before, {r['bare_after']:.2f} after the night); "
              f"/ the profile's prompted forward ({own:.2f} images/s): {r['steady_images_per_s'] / own:.2f}")
    if len(results) > 1:
        rss = results[1]["peak_tree_mb"] / r0["peak_tree_mb"]
        pss = results[1]["peak_tree_pss_mb"] / r0["peak_tree_pss_mb"]
        print(f"  ratio peak RSS at {results[1]['images']} / at {r0['images']} images: {rss:.2f} (target <= 1.2; "
              f"PSS, shared pages counted once: {pss:.2f})")
    if args.heap_ab:
        print(f"  heap policy A/B, {args.images}-image night, steady images/s in run order: keep large blocks "
              f"{' '.join(f'{x:.2f}' for x in ab['keep'])}; glibc default {' '.join(f'{x:.2f}' for x in ab['default'])}; "
              f"ratio of the means {np.mean(ab['keep']) / np.mean(ab['default']):.2f}")
    for flags, steady in variants.items():
        print(f"  {flags} on the {args.images}-image night: start-up {steady['startup_s']:.1f} s, steady "
              f"{steady['steady_images_per_s']:.2f} images/s, ratio to the first night's "
              f"{r0['steady_images_per_s']:.2f}: {steady['steady_images_per_s'] / r0['steady_images_per_s']:.2f}")
    if args.decode_ab:
        print(f"  decode A/B, {args.images}-image night, steady images/s in run order: CPU tasks "
              f"{' '.join(f'{x:.2f}' for x in decode_ab['cpu'])}; on the scoring actor "
              f"{' '.join(f'{x:.2f}' for x in decode_ab['device'])}; ratio of the means (actor / CPU tasks) "
              f"{np.mean(decode_ab['device']) / np.mean(decode_ab['cpu']):.2f}")
    gpu_use = gpu_in_windows(args.gpu_log, windows) if args.gpu_log else {}
    for name, (util, mem, n) in gpu_use.items():
        print(f"  GPU in the steady state, {name}: utilisation {util:.0f}% (mean of {n} samples), memory {mem:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "nights": results, "profile": prof, "setup_s": setup_s, "heap_ab": ab,
                       "decode_ab": decode_ab, "variants": variants,
                       "gpu_use": gpu_use}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
