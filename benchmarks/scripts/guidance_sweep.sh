#!/usr/bin/env bash
# Issue 18, part 3: the shipped teachers' DPM-Solver++ 25 under the strict judge, guidance 1 to 9, 1,000 prompts each
# (open prompts for world-teacher-open, exact ones for world-teacher). Writes eval.{json,md}, grid.png and one
# contact sheet per guidance (64 tiles, verdicts drawn) under benchmarks/results/judge/sweep-{open,exact}/.
# Two CPU threads, one run at a time; about 11 minutes per teacher on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1
G=1,1.5,2,3,4,5,6,7.5,9
.venv/bin/lcmkit eval src/lcmkit_world/assets/world-teacher-open --prompts open --sampler dpm-solver++ --steps 25 \
    --guidance $G --num 1000 --out benchmarks/results/judge/sweep-open --overwrite
.venv/bin/lcmkit eval src/lcmkit_world/assets/world-teacher --prompts exact --sampler dpm-solver++ --steps 25 \
    --guidance $G --num 1000 --out benchmarks/results/judge/sweep-exact --overwrite
