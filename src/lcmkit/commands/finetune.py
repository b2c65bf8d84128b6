"""``lcmkit finetune --model LCM_DIR --data PATH --out DIR [--lora FILE] [--config FILE.yaml] [options]``.

Latent consistency fine-tuning (LCM paper, Algorithm 4) of a full LCM folder, or of an LCM-LoRA (``--lora``) on
its base model. Parses flags into a :class:`~lcmkit.train.finetune.FinetuneConfig` (defaults ← YAML ← flags) and
calls :func:`lcmkit.train.finetune.finetune`. :func:`add_training_args` holds the options every fine-tuning recipe
shares (also used by ``lcmkit lora train``).
"""

from __future__ import annotations

import argparse
import os

from .distill import _bool


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Data, loop, checkpoint, validation, precision and AdamW options (names as the config fields)."""
    a = p.add_argument
    a("--config", default=None, help="YAML file with any of the options (flags override it)")
    a("--data", help="imagefolder with metadata.jsonl, webdataset .tar shards (file/folder/glob/{a..b}), "
                     "or world / world:outlined")
    a("--resolution", type=int, help="training pixels (default: the model's native size)")
    a("--crop", choices=("center", "random"), help="square crop (default center)")
    a("--flip", type=_bool, help="random horizontal flip, true/false (default false)")
    a("--caption-key", help="imagefolder caption column (default text)")
    a("--world-samples", type=int, help="size of the built-in world dataset (default 10000)")
    a("--cache-latents", type=_bool, help="encode every image once with the VAE posterior mean (default false)")
    a("--cache-text", type=_bool, help="encode every caption once (default: true for the world)")
    a("--batch-size", type=int, help="per process and micro-batch (default 8)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--max-steps", type=int, help="optimizer steps (default 1000)")
    a("--stop-at", type=int, help="stop with a checkpoint after this step (schedule unchanged; continue with --resume)")
    a("--mixed-precision", choices=("no", "fp16", "bf16"), help="(default no)")
    a("--gradient-checkpointing", type=_bool, help="trade compute for memory (default false)")
    a("--seed", type=int, help="seed of the data order, world images and all training draws (default 0)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    a("--keep-checkpoints", type=int, help="how many checkpoints to keep (default 3; 0 = all)")
    a("--validate-every", type=int, help="steps between validation grids (default 500; 0 = at the end only)")
    a("--validation-prompts", nargs="+", help="prompts of the validation grid (default: first captions)")
    a("--validation-seed", type=int, help="seed of the grid's first column (default 0)")
    a("--log-every", type=int, help="steps between log lines (default 10)")
    a("--max-nonfinite", type=int, help="stop after this many non-finite steps in a row (default 5)")
    a("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    a("--overwrite", action="store_true", default=None, help="delete the results already there")
    a("--device", choices=("auto", "cpu"), help="(default auto)")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    a("--adam-beta1", type=float)
    a("--adam-beta2", type=float)
    a("--weight-decay", type=float, help="(default 0)")
    a("--adam-eps", type=float)
    a("--warmup-steps", type=int, help="linear warm-up, optimizer steps (default 100)")
    a("--lr-schedule", choices=("constant", "cosine"), help="after warm-up (default constant)")
    a("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0 = off)")


def overrides(args) -> dict:
    """The parsed flags as config overrides (None = not given)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run", "config", "lora_command")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="latent consistency fine-tuning (LCF) of an LCM or LCM-LoRA on new data",
                       description="Fine-tune a full LCM folder, or an LCM-LoRA on its base model (--lora), on a "
                                   "dataset with the consistency loss alone (LCM paper, Algorithm 4: no teacher). "
                                   "Flags override the --config YAML file.")
    a = p.add_argument
    a("--model", help="full LCM pipeline folder (UNet with a guidance embedding), or the base model of --lora")
    a("--lora", help="LCM-LoRA .safetensors (diffusers, PEFT or kohya) to fine-tune on --model; the result is "
                     "written in the same format")
    a("--out", help="output folder (refused if it has results, unless --resume or --overwrite)")
    a("--ema", type=float, help="target EMA rate mu, full LCM (default 0.95; 0 = copy of the online weights)")
    a("--omega", type=float, help="fixed paper guidance omega for the w-embedding (= guidance_scale - 1)")
    a("--omega-min", type=float, help="omega ~ U[min, max] per sample (default 5 SD / 3 SDXL)")
    a("--omega-max", type=float, help="(default 15)")
    a("--skip", type=int, help="skipping step k (default 20)")
    a("--loss", choices=("l2", "huber"), help="distance (default huber)")
    a("--huber-c", type=float, help="pseudo-Huber c (default 0.001)")
    a("--validation-steps", type=int, nargs="+", help="LCM step counts, one grid row each (default 1 2 4)")
    a("--validation-omega", type=float, help="omega of the full LCM's w-embedding in grids (default 7)")
    add_training_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from lcmkit.train.common import build_config
    from lcmkit.train.finetune import FinetuneConfig, finetune

    cfg = build_config(FinetuneConfig, args.config, overrides(args))
    result = finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line, also under torchrun / accelerate launch
        print(result)
    return 0
