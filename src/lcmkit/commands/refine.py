"""``lcmkit refine --model LCM_DIR --data DATA --out DIR [--teacher DIR] [--config FILE.yaml] [options]``.

One-step refinement of a full LCM after distillation (lcmkit's addition, not in the LCM paper): the one-step output
is regressed onto deterministic solutions from the same noise while the rest of the grid is held to the starting
model. Parses flags into a :class:`~lcmkit.train.refine.RefineConfig` (defaults ← YAML ← flags) and calls
:func:`lcmkit.train.refine.refine`. The options every recipe shares come from
:func:`lcmkit.commands._training.add_training_args`.
"""

from __future__ import annotations

import argparse

from ._training import add_distance_args, add_training_args, run_recipe

#: refine's loop defaults (as :class:`lcmkit.train.refine.RefineConfig` sets them): the measured recipe, AdamW lr 1e-4
DEFAULTS = {"batch_size": 32, "max_steps": 4000, "warmup_steps": 0, "lr_schedule": "cosine"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refine", help="one-step refinement of a full LCM after distillation (lcmkit's addition)",
                       description="Refine a full LCM folder's one-step output: regress f(x_T, omega, c, t_top) onto "
                                   "deterministic solutions from the same x_T (the teacher's DPM-Solver++ 25 with "
                                   "--teacher, else the LCM's own TCD with gamma = 0) while holding the rest of the "
                                   "grid to the starting model. Not in the LCM paper. Flags override the --config "
                                   "YAML file.")
    # the same add_argument shape as finetune's on purpose: each command lists its own options and their help
    a = p.add_argument
    a("--model", help="full LCM pipeline folder (UNet with a guidance embedding), e.g. lcmkit distill --mode full")
    a("--teacher", help="base pipeline folder: pairs are its DPM-Solver++ 25-step solutions with CFG at guidance "
                        "omega + 1 (default: the LCM's own deterministic TCD)")
    a("--out", help="output folder (refused if it has results, unless --resume or --overwrite)")
    a("--omega", type=float, help="paper guidance omega of the w-embedding and of the teacher's CFG (default 6.5)")
    a("--num-pairs", type=int, help="(noise, solution) pairs made at the start (default 12000)")
    a("--pair-steps", type=int, help="TCD steps of the LCM's own solutions, without --teacher (default 4)")
    a("--anchor-weight", type=float, help="weight of the rest-of-grid anchor to the starting model (default 1; "
                                          "0 = the top timestep only)")
    add_distance_args(p)
    add_training_args(p, DEFAULTS)
    p.set_defaults(run=run)


def run(args) -> int:
    from lcmkit.train.refine import RefineConfig, refine

    return run_recipe(RefineConfig, refine, args)
