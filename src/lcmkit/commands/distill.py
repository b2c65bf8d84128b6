"""``lcmkit distill --teacher DIR --data PATH --out DIR [--config FILE.yaml] [options]``.

Parses flags into a :class:`~lcmkit.train.distill.DistillConfig` (defaults ← YAML ← flags) and calls
:func:`lcmkit.train.distill.distill`. Every option can also be set in the YAML file under the same name
(``-`` or ``_``; AdamW/LR options flat or under ``optim:``).
"""

from __future__ import annotations

import argparse

from ._training import (
    add_consistency_args,
    add_lora_save_args,
    add_training_args,
    run_recipe,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="latent consistency distillation (full LCM or LCM-LoRA) of an SD/SDXL/SD3/"
                                       "FLUX teacher",
                       description="Distil a Stable-Diffusion-family teacher into a few-step LCM (LCM paper, "
                                   "Algorithm 1) or an LCM-LoRA; an SD3/SD3.5 or FLUX.1 (flow-matching) teacher "
                                   "into an LCM-LoRA. Flags override the --config YAML file.")
    a = p.add_argument
    a("--teacher", help="teacher diffusers pipeline folder (SD 1.x/2.x eps or v, SDXL; SD3/SD3.5, FLUX.1 for "
                        "--mode lora)")
    a("--out", help="output folder (refused if it has results, unless --resume or --overwrite)")
    a("--mode", choices=("full", "lora"), help="full: w-embedding LCM + EMA target (UNet teachers); lora: LCM-LoRA "
                                               "(default)")
    a("--lora-rank", type=int, help="LoRA rank (default 64)")
    a("--lora-alpha", type=float, help="LoRA alpha (default 64)")
    a("--ema", type=float, help="target EMA rate mu, full mode (default 0.95; 0 = copy of the online weights)")
    a("--lora-ema", type=float, help="LoRA mode: EMA rate mu of the adapter weights used as the target "
                                     "(default 0 = the online model, as the LCM-LoRA scripts)")
    a("--omega", type=float, help="fixed paper guidance omega (= guidance_scale - 1)")
    a("--solver", choices=("ddim", "dpm-solver", "dpm-solver++", "euler", "heun"),
      help="teacher ODE solver: ddim (default), dpm-solver, dpm-solver++ for UNet teachers; euler (default), heun "
           "for flow-matching (SD3, FLUX) teachers")
    a("--top-fraction", type=float, help="extra share of pairs at the grid's top point, where 1-step sampling "
      "starts (not in the paper; default 0 = uniform)")
    add_lora_save_args(p)
    add_consistency_args(p)
    add_training_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from lcmkit.train.distill import DistillConfig, distill

    return run_recipe(DistillConfig, distill, args)
