#!/usr/bin/env bash
# Issue 18, part 3: the shipped teachers' DPM-Solver++ 25 under the strict judge, guidance 1 to 9, 1,000 prompts each
# (open prompts for world-teacher-open, exact ones for world-teacher). Writes eval.{json,md}, grid.png and one
# contact sheet per guidance (64 tiles, verdicts drawn) under benchmarks/results/judge/sweep-open/, and for the
# exact teacher in two calls (low and high guidance, so a slow machine keeps the first half) sweep-exact/ and
# sweep-exact-high/. About 8 minutes per teacher alone on 2 cores.
# Usage: bash benchmarks/scripts/guidance_sweep.sh [open] [exact-low] [exact-high]   (default all three)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
A=src/lcmkit_world/assets
R=benchmarks/results/judge
sweep() {  # teacher prompts guidances out
  .venv/bin/lcmkit eval "$A/$1" --prompts "$2" --sampler dpm-solver++ --steps 25 --guidance "$3" --num 1000 \
    --out "$R/$4" --overwrite
}
for part in "${@:-open exact-low exact-high}"; do
  case $part in
    open) sweep world-teacher-open open 1,1.5,2,3,4,5,6,7.5,9 sweep-open ;;
    exact-low) sweep world-teacher exact 1,1.5,2,3 sweep-exact ;;
    exact-high) sweep world-teacher exact 4,5,6,7.5,9 sweep-exact-high ;;
    *) echo "unknown part $part (open, exact-low, exact-high)" >&2; exit 2 ;;
  esac
done
