"""Shared argparse pieces: the options every training recipe shares (distill, finetune, lora train), list types.

Names match the fields of :class:`lcmkit.train.config.TrainingOptions` and :class:`~lcmkit.train.config.OptimConfig`
(``-`` for ``_``), so a flag, a YAML key and a config field are one thing. Unset flags stay None and do not
override the YAML file.
"""

from __future__ import annotations

import argparse
import os


def comma_list(kind):
    """argparse type: ``"1,2,4"`` → ``[1, 2, 4]`` of ``kind``."""
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")



#: defaults of the shared options that a recipe may change (its config class sets the same values; the help says them)
LOOP_DEFAULTS = {"batch_size": 8, "max_steps": 1000, "warmup_steps": 100, "lr_schedule": "constant"}


def add_model_config_arg(p: argparse.ArgumentParser) -> None:
    """``--model-config``: where a single-file model's configs come from (``lcmkit.single_file``; the CLI applies it
    around the whole command, so it is no config field)."""
    p.add_argument("--model-config", metavar="DIR|NAME", default=None,
                   help="for a single-file .safetensors model: a diffusers pipeline folder of its architecture (its "
                        "configs and tokenizers; weights optional), or a config lcmkit ships: sd15, sd21 (768 px, "
                        "v-prediction), sd21-base (512 px, epsilon), sdxl (default: the file's family)")


def add_training_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Data, loop, checkpoint, validation, precision and AdamW options (names as the config fields).

    ``defaults``: the recipe's own values of any :data:`LOOP_DEFAULTS` key, for the help text."""
    d = {**LOOP_DEFAULTS, **(defaults or {})}
    a = p.add_argument
    a("--config", default=None, help="YAML file with any of the options (flags override it)")
    add_model_config_arg(p)
    a("--data", help="imagefolder with metadata.jsonl, webdataset .tar shards (file/folder/glob/{a..b}), "
                     "or the name of a generated dataset a plug-in registers (lcmkit_world's: world, world:outlined, "
                     "world:open)")
    a("--resolution", type=int, help="training pixels (default: the model's native size)")
    a("--crop", choices=("center", "random"), help="square crop (default center)")
    a("--flip", type=_bool, help="random horizontal flip, true/false (default false)")
    a("--caption-key", help="imagefolder caption column (default text)")
    a("--generated-samples", "--world-samples", dest="generated_samples", type=int, help="size of a generated dataset (default 10000)")
    a("--cache-latents", type=_bool, help="encode every image once with the VAE posterior mean (default false)")
    a("--cache-text", type=_bool, help="encode every caption once (default: true for generated datasets)")
    a("--batch-size", type=int, help=f"per process and micro-batch (default {d['batch_size']})")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--max-steps", type=int, help=f"optimizer steps (default {d['max_steps']})")
    a("--stop-at", type=int, help="stop with a checkpoint after this step (schedule unchanged; continue with --resume)")
    a("--mixed-precision", choices=("no", "fp16", "bf16"), help="(default no)")
    a("--gradient-checkpointing", type=_bool, help="trade compute for memory (default false)")
    a("--seed", type=int, help="seed of the data order, generated images and all training draws (default 0)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    a("--keep-checkpoints", type=int, help="how many checkpoints to keep (default 3; 0 = all)")
    a("--validate-every", type=int, help="steps between validation grids (default 500; 0 = at the end only)")
    a("--validation-prompts", nargs="+", help="prompts of the validation grid (default: first captions)")
    a("--validation-seed", type=int, help="seed of the grid's first column (default 0)")
    a("--log-every", type=int, help="steps between log lines (default 10)")
    a("--max-nonfinite", type=int, help="stop after this many non-finite steps in a row (default 5)")
    a("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    a("--overwrite", action="store_true", default=None,
      help="replace the results already there (kept until the new run has written its first checkpoint)")
    a("--allow-changed-recipe", action="store_true", default=None,
      help="with --resume: continue although the recipe (teacher, data, lr, seed, ...) differs from the "
           "checkpoint's (refused by default; recorded in logs/resumes.jsonl)")
    a("--device", choices=("auto", "cpu"), help="(default auto)")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    a("--adam-beta1", type=float)
    a("--adam-beta2", type=float)
    a("--weight-decay", type=float, help="(default 0)")
    a("--adam-eps", type=float)
    a("--warmup-steps", type=int, help=f"linear warm-up, optimizer steps (default {d['warmup_steps']})")
    a("--lr-schedule", choices=("constant", "cosine"), help=f"after warm-up (default {d['lr_schedule']})")
    a("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0 = off)")


def overrides(args) -> dict:
    """The parsed flags as config overrides (None = not given)."""
    return {k: v for k, v in vars(args).items()
            if k not in ("command", "run", "config", "lora_command", "model_config")}


def run_recipe(config_cls, recipe, args) -> int:
    """Build ``config_cls`` (defaults ← ``--config`` YAML ← flags), run ``recipe`` on it and print what it returns
    (the result's path) once: on rank 0 only, also under torchrun / accelerate launch."""
    from lcmkit.train.config import build_config
    from lcmkit.train.folder import abandon_all

    try:
        result = recipe(build_config(config_cls, args.config, overrides(args)))
    finally:  # a failed run: what its --overwrite moved aside comes back, its lock goes
        abandon_all()
    if int(os.environ.get("RANK", "0")) == 0:
        print(result)
    return 0


def add_lora_save_args(p: argparse.ArgumentParser) -> None:
    """How the trained LoRA is written (``lcmkit.train.config.LoraSaveOptions``): which files, in what precision."""
    p.add_argument("--lora-format", metavar="FORMATS",
                   help="comma list of kohya, diffusers, peft, comfyui: one LoRA file each. Default kohya,diffusers "
                        "for UNet models: the diffusers-keyed file at the usual path for diffusers' "
                        "load_lora_weights, and <name>_kohya.safetensors beside it, which ComfyUI, Forge, "
                        "AUTOMATIC1111 and sd-scripts apply whole. Default diffusers,comfyui for flow transformers "
                        "(SD3, FLUX; no kohya names): the diffusers file, and <name>_comfyui.safetensors with an "
                        "alpha tensor per layer, which ComfyUI reads")
    p.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), help="LoRA weights' dtype (default fp32)")


def add_distance_args(p: argparse.ArgumentParser) -> None:
    """The consistency distance d (``lcmkit.losses.consistency_distance``): its kind and the pseudo-Huber c."""
    p.add_argument("--loss", choices=("l2", "huber"), help="distance (default huber)")
    p.add_argument("--huber-c", type=float, help="pseudo-Huber c (default 0.001)")


def add_consistency_args(p: argparse.ArgumentParser) -> None:
    """ω range, skip k, distance and LCM validation grids: the options of both consistency recipes
    (``lcmkit distill`` and ``lcmkit finetune``); names as their config fields."""
    a = p.add_argument
    a("--omega-min", type=float, help="omega ~ U[min, max] per sample (default 5 SD / 3 SDXL / 2.5 SD3 and FLUX "
                                      "with true CFG / 1 FLUX.1-dev, whose embedded guidance g = omega + 1)")
    a("--omega-max", type=float, help="(default 15; SD3 and FLUX with true CFG: 6; FLUX.1-dev: 4)")
    a("--skip", type=int, help="skipping step k (default 20)")
    add_distance_args(p)
    a("--validation-steps", type=int, nargs="+", help="LCM step counts, one grid row each (default 1 2 4)")
    a("--validation-omega", type=float, help="omega in validation grids: a full LCM's w-embedding (default 7); "
                                             "FLUX.1-dev's embedded g = omega + 1 (default: mid omega range)")
