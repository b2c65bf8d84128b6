"""``lcmkit lora ...``: LoRA tools.

- ``lcmkit lora combine BASE --lora FILE:λ [--lora FILE:λ ...] --out DIR [--overwrite]``: task arithmetic
  θ' = θ_pre + Σ λ_i τ_i (LCM-LoRA report eq. 3) merged into a standalone diffusers pipeline folder of the same
  class as BASE (safetensors), e.g. a style LoRA at 0.8 plus LCM-LoRA at 1.0: :func:`lcmkit.task_arithmetic.combine`.
- ``lcmkit lora train --model DIR --data PATH --out FILE.safetensors [options]``: a style LoRA (ordinary diffusion
  fine-tuning of the base model's UNet through a LoRA), written as ``--lora-format`` says (default: diffusers' keys
  at FILE, kohya's beside it). Owner: train/style_lora.py.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("lora", help="LoRA tools: merge LoRAs into a model (task arithmetic)")
    lora_sub = parser.add_subparsers(dest="lora_command", metavar="LORA_COMMAND", required=True)
    _register_combine(lora_sub)
    _register_train(lora_sub)


# --- combine (owner: task_arithmetic.py) ---------------------------------------------------------------------
def _register_combine(lora_sub) -> None:
    p = lora_sub.add_parser(
        "combine", help="merge LoRAs with weights λ into a standalone pipeline folder",
        description="θ' = θ_pre + Σ λ_i·τ_i: merge LoRA files (kohya, PEFT or diffusers format, safetensors only) "
                    "into BASE's UNet (and text encoders where a LoRA touches them) and save a diffusers "
                    "pipeline folder of the same class.")
    from ._training import add_model_config_arg

    p.add_argument("base", metavar="BASE", help="diffusers pipeline folder (or .safetensors single-file "
                                                "checkpoint) to merge into")
    add_model_config_arg(p)
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:λ]",
                   help="a .safetensors LoRA and its weight λ (default 1.0); repeat for several")
    p.add_argument("--out", required=True, help="output pipeline folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing pipeline folder at --out (only one with a model_index.json)")
    p.set_defaults(run=run_combine)


def run_combine(args) -> int:
    from lcmkit.task_arithmetic import combine

    record = combine(args.base, args.lora, args.out, overwrite=args.overwrite)
    parts = ", ".join(f"{r['file']} × {r['lambda']:g} ({r['layers']} layers)" for r in record["loras"])
    print(f"merged {parts} into {record['pipeline_class']} at {args.out}")
    return 0


# --- train (owner: the LoRA training recipe) ------------------------------------------------------------------
def _register_train(lora_sub) -> None:
    from ._training import add_lora_save_args, add_training_args

    p = lora_sub.add_parser(
        "train", help="train a style LoRA on a base model (diffusion loss)",
        description="Ordinary diffusion fine-tuning of a base model through a LoRA (noise-prediction loss matching "
                    "the model's prediction_type, uniform t, optional caption dropout). The file can be combined "
                    "with an LCM-LoRA: lcmkit generate BASE --lora style.safetensors:0.8 --lora lcm.safetensors. "
                    "Flags override the --config YAML file.")
    a = p.add_argument
    a("--model", help="base diffusers pipeline folder (SD 1.x/2.x eps or v, SDXL)")
    a("--out", help="the LoRA file to write (.safetensors; refused if it exists, unless --overwrite/--resume)")
    a("--run-dir", help="checkpoints, logs, grids (default: <out without .safetensors>.run)")
    a("--lora-rank", type=int, help="LoRA rank (default 16)")
    a("--lora-alpha", type=float, help="LoRA alpha (default 16)")
    a("--lora-targets", help="target preset: lcm-lora (attention + conv, default) or attention; or a comma list "
                             "of module-name suffixes")
    a("--caption-dropout", type=float, help="probability of training a sample unconditionally (default 0)")
    a("--validation-steps", type=int, help="DDIM steps of the validation grid (default 25)")
    a("--validation-guidance", type=float, help="guidance_scale of the validation grid (default 7.5)")
    add_lora_save_args(p)
    add_training_args(p)
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from lcmkit.train.style_lora import StyleLoraConfig, train_style_lora

    from ._training import run_recipe

    return run_recipe(StyleLoraConfig, train_style_lora, args)
