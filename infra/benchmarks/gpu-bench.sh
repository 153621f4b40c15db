#!/usr/bin/env bash
# Issue 11's GPU figures in one command, from the project root of a machine with a CUDA GPU:
#   infra/benchmarks/gpu-bench.sh [IMAGES] [OUT_DIR]          (defaults: 20000 images, ./gpu-bench-out)
# 0. tests/gpu (the CUDA paths: bf16 scoring, GPU bank search, nvJPEG decode);
# 1. a night of IMAGES JPEGs of 1024 px through the real `jobs.score` (ViT-B-16-plus-240, bf16, batch 256):
#    start-up, steady state, per-stage times (decode both ways: PIL in CPU tasks, nvJPEG in the actor), the
#    bare-forward rate and the ratio; then the same night again with JPEGs decoded by the CPU tasks and by the
#    scoring actor (--decode cpu / device), interleaved: whether nvJPEG wins on this node;
# 2. fitting a 15-product x 4-shot deployment for 100 epochs (Ray Train start-up included): seconds per epoch.
# Needs the project installed with its GPU extra (pip install -e '.[gpu]'). On the lent device machine, pack
# Ray here first (../shared/device/pack-ray.sh), carry .gpu, and this script unpacks it. Random-init weights:
# timings are real, scores meaningless (the output says so).
# A smoke run of the same commands on a CPU machine, to check the plumbing (not a measurement):
#   ALLOW_CPU=1 BACKBONE=ViT-S-16 SIZE=256 BATCH=32 EPOCHS=1 PRODUCTS=2 infra/benchmarks/gpu-bench.sh 96 /tmp/smoke
set -euo pipefail
images=${1:-20000}
out=${2:-gpu-bench-out}
backbone=${BACKBONE:-ViT-B-16-plus-240} size=${SIZE:-1024} batch=${BATCH:-256}
epochs=${EPOCHS:-100} products=${PRODUCTS:-15}
mkdir -p "$out"
if [ -f .gpu/unpack-ray.sh ]; then source .gpu/unpack-ray.sh; fi
python -c "import torch, os; assert torch.cuda.is_available() or os.environ.get('ALLOW_CPU'), 'no CUDA GPU here'
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU ONLY: a smoke run, not a measurement')"
export HF_HUB_OFFLINE=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 5 > "$out/gpu-utilisation.csv" &
  smi=$!
  trap 'kill $smi 2>/dev/null || true' EXIT
fi
# the CUDA paths' own tests first (bf16 scoring, GPU bank search, nvJPEG decode): figures from a broken path mean nothing
python -m pytest --noconftest -q tests/gpu 2>&1 | tee "$out/gpu-tests.log" \
  || echo "WARNING: tests/gpu did not pass (see $out/gpu-tests.log): read the figures below with that in mind"
python -m jobs.night_bench --images "$images" --scale 0 --size "$size" --format jpeg --backbone "$backbone" \
  --batch-size "$batch" --decode-ab "${DECODE_AB:-1}" --json "$out/night.json" 2>&1 | tee "$out/night.log"
python -m jobs.throughput --products "$products" --shots 4 --epochs "$epochs" --night 20 --backbone "$backbone" \
  --batch-size "$batch" 2>&1 | tee "$out/fit-${products}x4.log"
