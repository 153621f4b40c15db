#!/usr/bin/env bash
# Issue 11's GPU figures in one command, from the project root of a machine with a CUDA GPU:
#   infra/benchmarks/gpu-bench.sh [IMAGES] [OUT_DIR]          (defaults: 20000 images, ./gpu-bench-out)
# 1. a night of IMAGES JPEGs of 1024 px through the real `jobs.score` (ViT-B-16-plus-240, bf16, batch 256):
#    start-up, steady state, per-stage times, the bare-forward rate and the ratio;
# 2. fitting a 15-product x 4-shot deployment for 100 epochs (Ray Train start-up included): seconds per epoch.
# Needs the project installed with its GPU extra (pip install -e '.[gpu]'). On the lent device machine, pack
# Ray here first (../shared/device/pack-ray.sh), carry .gpu, and this script unpacks it. Random-init weights:
# timings are real, scores meaningless (the output says so).
set -euo pipefail
images=${1:-20000}
out=${2:-gpu-bench-out}
mkdir -p "$out"
if [ -f .gpu/unpack-ray.sh ]; then source .gpu/unpack-ray.sh; fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name())"
export HF_HUB_OFFLINE=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 5 > "$out/gpu-utilisation.csv" &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
python -m jobs.night_bench --images "$images" --scale 0 --size 1024 --format jpeg --backbone ViT-B-16-plus-240 \
  --batch-size 256 --json "$out/night.json" 2>&1 | tee "$out/night.log"
python -m jobs.throughput --products 15 --shots 4 --epochs 100 --night 20 --backbone ViT-B-16-plus-240 \
  --batch-size 256 2>&1 | tee "$out/fit-15x4.log"
