"""``lcmkit finetune --model LCM_DIR --data PATH --out DIR [--lora FILE] [--config FILE.yaml] [options]``.

Latent consistency fine-tuning (LCM paper, Algorithm 4) of a full LCM folder, or of an LCM-LoRA (``--lora``) on
its base model. Parses flags into a :class:`~lcmkit.train.finetune.FinetuneConfig` (defaults ← YAML ← flags) and
calls :func:`lcmkit.train.finetune.finetune`. The options every recipe shares come from
:func:`lcmkit.commands._training.add_training_args`.
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
    p = sub.add_parser("finetune", help="latent consistency fine-tuning (LCF) of an LCM or LCM-LoRA on new data",
                       description="Fine-tune a full LCM folder, or an LCM-LoRA on its base model (--lora), on a "
                                   "dataset with the consistency loss alone (LCM paper, Algorithm 4: no teacher). "
                                   "Flags override the --config YAML file.")
    a = p.add_argument
    a("--model", help="full LCM pipeline folder (UNet with a guidance embedding), or the base model of --lora")
    a("--lora", help="LCM-LoRA .safetensors (diffusers, PEFT or kohya) to fine-tune on --model; the result is "
                     "written as --lora-format says")
    a("--out", help="output folder (refused if it has results, unless --resume or --overwrite)")
    a("--ema", type=float, help="target EMA rate mu, full LCM (default 0.95; 0 = copy of the online weights)")
    a("--omega", type=float, help="fixed paper guidance omega for the w-embedding (= guidance_scale - 1)")
    add_lora_save_args(p)
    add_consistency_args(p)
    add_training_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from lcmkit.train.finetune import FinetuneConfig, finetune

    return run_recipe(FinetuneConfig, finetune, args)
