#!/usr/bin/env bash
# Session 7: is the full LCM's 1-step gap (issue 4) the network's capacity or the training signal?
# Every command behind benchmarks/results/open/one-step/capacity/ and .../guidance/, in the order they ran.
# Usage: bash benchmarks/scripts/one_step_probes.sh   (from the repository root, after `make install` and
# benchmarks/scripts/lcm_recipes.sh, which distils runs/open-lcm5 (pseudo-Huber c = 0.001) and runs/open-lcm13
# (c = 0.02); ≈ 2.5 h on one core)
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
L=.venv/bin/lcmkit
P=".venv/bin/python benchmarks/scripts/one_step_capacity.py"
T=src/lcmkit_world/assets/world-teacher-open
R=benchmarks/results/open/one-step
mkdir -p runs/s7
# 1. is guidance a lever at one step? (the ω-range model open-lcm2 and the fixed-ω = 6.5 model open-lcm5)
$L eval runs/open-lcm2/pipeline --prompts open --steps 1 --guidance 3,5,7.5,10,13,16 --num 1000 --out $R/guidance-lcm2
$L eval runs/open-lcm5/pipeline --prompts open --steps 1 --guidance 4,6,7.5,9,11 --num 1000 --out $R/guidance-lcm5
# the c = 0.02 LCM's deterministic TCD (γ = 0), the pair source of step 4's self-targeted probe
$L eval runs/open-lcm13/pipeline --prompts open --sampler tcd --eta 0 --steps 2,4,8 --guidance 7.5 --num 1000 \
  --out $R/tcd0-lcm13
# 2. the teacher's ODE solutions (DPM-Solver++ 25, guidance 7.5) from 12,000 noises and open prompts, none of
#    them the evaluation's (≈ 9 min per 4,000 on one core)
for s in 0 4000 8000; do
  $P pairs $T runs/s7/pairs-$s.safetensors --start $s --count 4000
done
# 3. regress the one-step output of the c = 0.001 LCM onto them (top timestep only)
TP=runs/s7/pairs-0.safetensors,runs/s7/pairs-4000.safetensors
$P train runs/open-lcm5/pipeline runs/s7/cap-lr1e-4 --pairs $TP --steps 1500 --lr 1e-4 --holdout 0
$P train runs/open-lcm5/pipeline runs/s7/cap-lr3e-4 --pairs $TP --steps 1500 --lr 3e-4 --holdout 0
$P train runs/open-lcm5/pipeline runs/s7/cap-long --pairs $TP --steps 6000 --lr 1e-4 --cosine
for r in cap-lr1e-4 cap-lr3e-4; do
  $L eval runs/s7/$r/pipeline --prompts open --steps 1,2,4 --guidance 7.5 --num 1000 --out runs/s7/$r/eval
done
$L eval runs/s7/cap-long/pipeline --prompts open --steps 1 --guidance 7.5 --num 1000 --out runs/s7/cap-long/eval
# 4. the same with the rest of the grid held to the starting model (--anchor): from the c = 0.02 LCM onto the
#    teacher's solutions, and onto 48,000 of the LCM's own deterministic 4-step TCD (γ = 0) solutions (≈ 9 min);
#    from the L2-loss LCM onto its own TCD solutions
$P pairs runs/open-lcm13/pipeline runs/s7/tcd-pairs.safetensors --start 20000 --count 48000 --tcd-steps 4
$P train runs/open-lcm13/pipeline runs/s7/cap-tcd-anchor --pairs runs/s7/tcd-pairs.safetensors --steps 3000 \
  --lr 1e-4 --cosine --anchor
$P train runs/open-lcm13/pipeline runs/s7/cap-teacher-anchor --pairs $TP,runs/s7/pairs-8000.safetensors \
  --steps 4000 --lr 1e-4 --cosine --anchor
$P pairs runs/open-lcm9/pipeline runs/s7/tcd-pairs-l2.safetensors --start 20000 --count 48000 --tcd-steps 4
$P train runs/open-lcm9/pipeline runs/s7/cap-l2-tcd-anchor --pairs runs/s7/tcd-pairs-l2.safetensors --steps 3000 \
  --lr 1e-4 --cosine --anchor
for r in cap-tcd-anchor cap-teacher-anchor cap-l2-tcd-anchor; do
  $L eval runs/s7/$r/pipeline --prompts open --steps 1,2,4 --guidance 7.5 --num 1000 --out runs/s7/$r/eval
  for s in 1 2; do
    $L eval runs/s7/$r/pipeline --prompts open --steps 1,2,4 --guidance 7.5 --num 1000 --seed $s \
      --out runs/s7/$r/eval-seed$s
  done
done
# 5. the table, plot and JSON; each probe's evals and summary beside them
O=benchmarks/results/open
$P report $R/capacity --lcd "c = 0.001=$O/lcm-lr5e-5" --lcd "c = 0.02=$O/lcm-huber-c0.02" --lcd "L2=$O/lcm-l2" \
  --lcd-seeds "c = 0.001=$O/seeds/lcm-lr5e-5-seed1" --lcd-seeds "c = 0.001=$O/seeds/lcm-lr5e-5-seed2" \
  --lcd-seeds "c = 0.02=$O/seeds/lcm-huber-c0.02-seed1" --lcd-seeds "c = 0.02=$O/seeds/lcm-huber-c0.02-seed2" \
  --lcd-seeds "L2=$O/seeds/lcm-l2-seed1" --lcd-seeds "L2=$O/seeds/lcm-l2-seed2" \
  --probe "c = 0.001, top only, lr 1e-4=runs/s7/cap-lr1e-4" --probe "c = 0.001, top only, lr 3e-4=runs/s7/cap-lr3e-4" \
  --probe "c = 0.001, top only, 6,000 steps=runs/s7/cap-long" \
  --probe "c = 0.02, anchored, own TCD-4 targets=runs/s7/cap-tcd-anchor" \
  --probe "c = 0.02, anchored, teacher targets=runs/s7/cap-teacher-anchor" \
  --probe "L2, anchored, own TCD-4 targets=runs/s7/cap-l2-tcd-anchor" --teacher-accuracy 0.993
for r in cap-lr1e-4 cap-lr3e-4 cap-long cap-tcd-anchor cap-teacher-anchor cap-l2-tcd-anchor; do
  mkdir -p $R/capacity/$r && cp runs/s7/$r/summary.json $R/capacity/$r/
  for e in runs/s7/$r/eval*; do
    mkdir -p $R/capacity/$r/$(basename $e) && cp $e/eval.md $e/eval.json $R/capacity/$r/$(basename $e)/
  done
done
# 6. the product stage, lcmkit refine, on the c = 0.02 LCM with its own TCD-4 pairs (≈ 9 min of pairs, then 3,000
#    steps at 0.55 s/step on one core), scored at 3 seeds
$L refine --model runs/open-lcm13/pipeline --data world:open --out runs/refine-tcd --num-pairs 48000 --pair-steps 4 \
  --omega 6.5 --batch-size 32 --max-steps 3000 --lr 1e-4 --lr-schedule cosine --warmup-steps 0 \
  --checkpoint-every 500 --validate-every 0 --no-progress
# copy_and_score RUN LAST_STEP: a refine run's summary, config and last validation grid into
# benchmarks/results/open/RUN, then lcmkit eval at seeds 0, 1, 2 (1,000 open prompts each), copied beside them
copy_and_score() {
  local run=runs/$1 out=benchmarks/results/open/$1
  mkdir -p $out && cp $run/summary.json $run/config.yaml $out/
  cp $run/validation/step-$(printf %07d $2).png $out/validation-step-$2.png
  for s in 0 1 2; do
    $L eval $run/pipeline --prompts open --steps 1,2,4 --guidance 7.5 --num 1000 --seed $s --out $run/eval-seed$s
    mkdir -p $out/eval-seed$s && cp $run/eval-seed$s/eval.* $run/eval-seed$s/grid.png $out/eval-seed$s/
  done
}
copy_and_score refine-tcd 3000
.venv/bin/python benchmarks/scripts/plot_losses.py benchmarks/results/open/refine-tcd/refine-loss.png \
  "lcmkit refine, own TCD-4 pairs (3000 steps)=runs/refine-tcd"
# 7. (session 8) lcmkit refine with the teacher's DPM-Solver++ 25 pairs (12,000; 15 min on two threads), then 4,000
#    steps at 0.31 s/step on two threads (≈ 21 min), scored at 3 seeds: the full LCM that meets issue 4's bars
OMP_NUM_THREADS=2 $L refine --model runs/open-lcm13/pipeline --teacher src/lcmkit_world/assets/world-teacher-open \
  --data world:open --out runs/refine-teacher --num-pairs 12000 --omega 6.5 --batch-size 32 --max-steps 4000 \
  --lr 1e-4 --lr-schedule cosine --warmup-steps 0 --checkpoint-every 500 --validate-every 0 --no-progress
copy_and_score refine-teacher 4000
O=benchmarks/results/open/refine-teacher
.venv/bin/python benchmarks/scripts/plot_losses.py $O/refine-loss.png \
  "lcmkit refine, teacher DPM-Solver++ 25 pairs (4000 steps)=runs/refine-teacher" \
  "lcmkit refine, own TCD-4 pairs (3000 steps)=runs/refine-tcd"
# 8. (session 8) the same refine with training seed 1 (other pairs: prompts and noise; other draws), to see how much
#    of step 7's result is that run's luck; same scoring
OMP_NUM_THREADS=2 $L refine --model runs/open-lcm13/pipeline --teacher src/lcmkit_world/assets/world-teacher-open \
  --data world:open --out runs/refine-teacher-seed1 --seed 1 --num-pairs 12000 --omega 6.5 --batch-size 32 \
  --max-steps 4000 --lr 1e-4 --lr-schedule cosine --warmup-steps 0 --checkpoint-every 500 --validate-every 0 \
  --no-progress
copy_and_score refine-teacher-seed1 4000
.venv/bin/python benchmarks/scripts/plot_losses.py benchmarks/results/open/refine-teacher-seed1/refine-loss.png \
  "lcmkit refine --teacher, seed 0=runs/refine-teacher" "lcmkit refine --teacher, seed 1=runs/refine-teacher-seed1"
# 9. (session 8) teacher-free, with twice the anchor: step 6's 48,000 own TCD-4 pairs (copied, so --resume reuses
#    them), --anchor-weight 2, 3,000 steps (the rest are refine's defaults, = step 6's flags), scored at 3 seeds
mkdir -p runs/refine-tcd-a2 && cp runs/refine-tcd/pairs.safetensors runs/refine-tcd-a2/
OMP_NUM_THREADS=2 $L refine --model runs/open-lcm13/pipeline --data world:open --out runs/refine-tcd-a2 --resume \
  --num-pairs 48000 --pair-steps 4 --anchor-weight 2 --omega 6.5 --max-steps 3000 --checkpoint-every 500 \
  --validate-every 0 --no-progress
copy_and_score refine-tcd-a2 3000
.venv/bin/python benchmarks/scripts/plot_losses.py benchmarks/results/open/refine-tcd-a2/refine-loss.png \
  "own TCD-4 pairs, anchor 1=runs/refine-tcd" "own TCD-4 pairs, anchor 2=runs/refine-tcd-a2"
