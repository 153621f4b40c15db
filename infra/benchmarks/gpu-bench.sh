#!/usr/bin/env bash
# The GPU night's figures, from the project root of a machine with a CUDA GPU:
#   infra/benchmarks/gpu-bench.sh [IMAGES] [OUT_DIR]          (defaults: 20000 images, ./gpu-bench-out)
# Steps (STEPS, default all four, in this order), each bounded by <STEP>_TIMEOUT seconds (default none) and
# independent: a step that fails or runs out of time is said, and the next one still runs.
#   profile  the night's stages in one process, no Ray (night_bench --in-process): per image, the CPU task's
#            decode and header check, the bare bf16 forward, Scorer.score, the scoring actor's whole call (both
#            decodes), the heatmap writer. ~1 min on an H200: run it first, it names the bottleneck.
#   tests    tests/gpu (bf16 scoring, GPU bank search, nvJPEG decode): figures from a broken path mean nothing.
#   night    a night of IMAGES JPEGs of 1024 px through the real `jobs.score` (ViT-B-16-plus-240, bf16, batch
#            256): start-up, steady state, cores busy by process, GPU utilisation in the steady state, the bare
#            forward before and after; then the same night once per VARIANTS entry (default: --decode cpu, the
#            JPEGs decoded by the CPU tasks instead of the default auto, which decodes on the GPU there; and two
#            scoring actors sharing the GPU). ~150 s of set-up + ~2 min a 20,000-image night on an H200.
#   fit      a 15-product x 4-shot deployment at the defaults (100 epochs, early stop) through jobs.train, Ray
#            Train start-up included.
# A lent device's call runs at most 10 min: the four steps take ~13 min on an H200, so split them over two
# calls on one warm machine (STEPS="profile tests fit", then STEPS=night).
# Needs the project's packages (pip install -e '.[gpu]'). On the lent device machine carry Ray packed by
# ../shared/device/pack-ray.sh in .gpu (unpacked here when `import ray` fails) and the other wheels as the
# device README says. Random-init weights: timings are real, scores meaningless (the output says so).
# A smoke run of the same commands on a CPU machine, to check the plumbing (not a measurement):
#   ALLOW_CPU=1 BACKBONE=ViT-S-16 SIZE=256 BATCH=32 SAMPLE=64 EPOCHS=1 PRODUCTS=2 infra/benchmarks/gpu-bench.sh 64 /tmp/smoke
# The GPU's utilisation and memory are sampled every half second (epoch-stamped, gpu-utilisation.csv) and
# night_bench averages them over each night's steady state.
set -euo pipefail
images=${1:-20000}
out=${2:-gpu-bench-out}
backbone=${BACKBONE:-ViT-B-16-plus-240} size=${SIZE:-1024} batch=${BATCH:-256}
epochs=${EPOCHS:-100} products=${PRODUCTS:-15} sample=${SAMPLE:-1024} python=${PYTHON:-python3}
steps=" ${STEPS:-profile tests night fit} "
variants=${VARIANTS:-"--decode cpu;--actors-per-shard 2"}
mkdir -p "$out"
# Ray packed by ../shared/device/pack-ray.sh, unless an earlier call already made it importable
if ! $python -c "import ray" 2>/dev/null && [ -f .gpu/unpack-ray.sh ]; then source .gpu/unpack-ray.sh; fi
$python -c "import torch, os; assert torch.cuda.is_available() or os.environ.get('ALLOW_CPU'), 'no CUDA GPU here'
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU ONLY: a smoke run, not a measurement')"
export HF_HUB_OFFLINE=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  # epoch seconds, utilisation %, memory MiB
  while true; do
    echo "$(date +%s.%N),$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits | head -1)"
    sleep 0.5
  done >> "$out/gpu-utilisation.csv" &
  smi=$!
  trap 'kill $smi 2>/dev/null || true' EXIT
fi
# timeout signals the step's process group; `ray stop` then ends a local Ray the step left behind
step() {
  local limit=$1 rc=0; shift
  if [ "$limit" -gt 0 ]; then timeout -k 10 "$limit" "$@" || rc=$?; else "$@" || rc=$?; fi
  [ "$rc" != 124 ] && [ "$rc" != 137 ] || $python -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
  return $rc
}
said() { echo "WARNING: step $1 failed or ran out of time: read the figures with that in mind"; }

if [[ $steps == *" profile "* ]]; then
  step "${PROFILE_TIMEOUT:-0}" $python -m jobs.bench.night_bench --in-process "${PROFILE_BATCHES:-6}" --size "$size" \
    --backbone "$backbone" --batch-size "$batch" --json "$out/in-process.json" 2>&1 | tee "$out/in-process.log" \
    || said profile
fi
if [[ $steps == *" tests "* ]]; then
  step "${TESTS_TIMEOUT:-0}" $python -m pytest --noconftest -q -p no:cacheprovider tests/gpu 2>&1 \
    | tee "$out/gpu-tests.log" || said tests
fi
if [[ $steps == *" night "* ]]; then
  extra=(--decode-ab "${DECODE_AB:-0}")
  [ -z "${smi:-}" ] || extra+=(--gpu-log "$out/gpu-utilisation.csv")
  IFS=';' read -ra vs <<< "$variants"
  for v in "${vs[@]}"; do [ -z "$v" ] || extra+=(--variant "$v"); done
  step "${NIGHT_TIMEOUT:-0}" $python -m jobs.bench.night_bench --images "$images" --scale 0 --size "$size" --format jpeg \
    --backbone "$backbone" --batch-size "$batch" --sample "$sample" "${extra[@]}" --json "$out/night.json" 2>&1 \
    | tee "$out/night.log" || said night
fi
if [[ $steps == *" fit "* ]]; then
  t0=$(date +%s.%N)
  step "${FIT_TIMEOUT:-0}" $python -m jobs.bench.throughput --products "$products" --shots 4 --epochs "$epochs" --night 20 \
    --backbone "$backbone" --batch-size "$batch" 2>&1 | tee "$out/fit-${products}x4.log" || said fit
  echo "fit benchmark wall (generate, ingest, train, promote, score, scorer loop): $($python -c "import time; print(round(time.time() - $t0, 1))") s" \
    | tee -a "$out/fit-${products}x4.log"
fi
