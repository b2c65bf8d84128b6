#!/usr/bin/env bash
# Issue 19 item 6: the LCM-LoRA as a universal acceleration module. An LCM-LoRA distilled on the exact-caption
# teacher (world-teacher, exact captions) is plugged, without training, into world-teacher-open, the model fine-tuned
# from it on open captions, and scored on open prompts under the strict judge (3,000 generations: evaluation seeds
# 0, 1, 2). The fine-tuned model's own rows (its DPM-Solver++ at 1/2/4/25 steps at its best guidance 1.5, the
# reference row, the undistilled control and the LCM-LoRA distilled on it, same recipe and ω) are those of
# benchmarks/results/strict/open (benchmarks/scripts/strict_results.sh), copied in so one table holds them all.
# Recipe: strict_omega.sh's (600 steps, batch 32, lr 1e-3 cosine, EMA target 0.95, DDIM k = 20, pseudo-Huber) at
# ω = 0.5, the ω of the native LoRA. ~8 min alone on 2 cores.
# Usage: bash benchmarks/scripts/universal.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
L=.venv/bin/lcmkit
R=benchmarks/results/universal
mkdir -p runs $R
[ -f runs/universal-lora/lora/pytorch_lora_weights.safetensors ] ||
  $L distill --teacher src/lcmkit_world/assets/world-teacher --data world --out runs/universal-lora --mode lora \
    --omega 0.5 --solver ddim --skip 20 --loss huber --batch-size 32 --max-steps 600 --lr 1e-3 --lr-schedule cosine \
    --warmup-steps 50 --lora-ema 0.95 --checkpoint-every 150 --validate-every 0 --no-progress --overwrite
$L bench quality --prompts open --parts table --methods lcm-lora --lora runs/universal-lora/lora --guidance 1.5 \
  --reference-guidance 1.5 --eval-seeds 0,1,2 --num 1000 --threads "$OMP_NUM_THREADS" --out runs/universal-bench
rm -rf $R/sheet && cp -r runs/universal-bench/sheets/lcm-lora $R/sheet   # contact sheets, verdicts drawn
cp runs/universal-bench/quality.json $R/transfer-quality.json; cp runs/universal-bench/quality.md $R/transfer-quality.md
.venv/bin/python benchmarks/scripts/universal_table.py runs/universal-bench/quality.json \
  benchmarks/results/strict/open/quality.json $R
