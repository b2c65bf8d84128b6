#!/usr/bin/env bash
# The world results of issues 3, 4 and 6 (quality table), in one go, on the shipped world teacher.
# Usage: bash benchmarks/scripts/world_results.sh   (from the repository root, after `make install`)
# Writes runs/lcm-full (distilled full LCM), demo/ (LCM-LoRA, `lcmkit demo`), benchmarks/results/quality.*
set -euo pipefail
export HF_HUB_OFFLINE=1
T=src/lcmkit_world/assets/world-teacher
L=.venv/bin/lcmkit
# 1. full LCM (w-embedding, EMA 0.95, DDIM teacher, k = 20, pseudo-Huber) and, beside it, the demo's LCM-LoRA
OMP_NUM_THREADS=1 $L distill --teacher $T --data world --out runs/lcm-full --mode full --omega-min 5 --omega-max 15 \
  --solver ddim --skip 20 --loss huber --batch-size 32 --max-steps 800 --lr 2e-4 --warmup-steps 50 \
  --checkpoint-every 200 --validate-every 400 --no-progress --overwrite > runs/lcm-full.log 2>&1 &
full=$!
OMP_NUM_THREADS=1 $L demo --overwrite > runs/demo.log 2>&1
wait $full
# 2. the paper's Table 1 on the world: teacher DDIM / DPM-Solver / DPM-Solver++ at 1-50 steps, LCM and LCM-LoRA at 1-8
$L bench quality --parts table --teacher $T --lcm runs/lcm-full/pipeline --lora demo/distill/lora --num 500 \
  --out benchmarks/results
