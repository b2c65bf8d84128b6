#!/usr/bin/env bash
# Issue 18: which ω to distil the world's LCM-LoRA at, under the strict judge. The demo's recipe (600 steps, batch 32,
# lr 1e-3 cosine, EMA target 0.95, DDIM k = 20, pseudo-Huber) on open captions at each fixed ω, scored at 1/2/4 LCM
# steps on 1,000 open prompts (seed 0). Writes benchmarks/results/strict/lora-omega/omega-<ω>/ (eval.json, sheets).
# Usage: bash benchmarks/scripts/strict_omega.sh [ω ...]   (default 0.5 1.5 3.5; ~6 min per ω alone on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
L=.venv/bin/lcmkit
T=src/lcmkit_world/assets/world-teacher-open
R=benchmarks/results/strict/lora-omega
mkdir -p runs $R
for w in "${@:-0.5 1.5 3.5}"; do
  for omega in $w; do
    $L distill --teacher $T --data world:open --out runs/lora-omega$omega --mode lora --omega $omega --solver ddim \
      --skip 20 --loss huber --batch-size 32 --max-steps 600 --lr 1e-3 --lr-schedule cosine --warmup-steps 50 \
      --lora-ema 0.95 --checkpoint-every 150 --validate-every 0 --no-progress --overwrite
    $L eval $T --lora runs/lora-omega$omega/lora/pytorch_lora_weights.safetensors --prompts open --sampler lcm \
      --steps 1,2,4 --guidance 1 --num 1000 --out $R/omega-$omega --overwrite
  done
done
