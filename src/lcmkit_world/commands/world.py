"""``lcmkit world ...``: the built-in shapes world (export data, train its teacher and its evaluator)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("world", help="the built-in shapes world: export data, train its teacher/evaluator")
    world_sub = parser.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)
    _register_export(world_sub)
    _register_train_classifier(world_sub)
    _register_train_teacher(world_sub)
    _register_train_flow_teacher(world_sub)


# --- export (owner: lcmkit_world/export.py) -------------------------------------------------------------------------
def _register_export(world_sub) -> None:
    p = world_sub.add_parser("export", help="render world images to an imagefolder or webdataset shards")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--n", required=True, type=int, help="number of images")
    p.add_argument("--style", choices=("filled", "outlined"), default="filled", help="drawing style (default filled)")
    p.add_argument("--format", dest="fmt", choices=("imagefolder", "webdataset"), default="imagefolder",
                   help="imagefolder: PNGs + metadata.jsonl; webdataset: shard-000000.tar, ... (default imagefolder)")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i) (default 0)")
    p.add_argument("--captions", choices=("exact", "open"), default="exact",
                   help="exact captions (all five attributes) or open ones (the shape and a random subset of the "
                        "rest, drawn per image from (seed, i)); default exact")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per webdataset shard (default 1000)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out; replaces earlier export files")

    def run(args) -> int:
        from lcmkit_world.export import export_world

        out = export_world(args.out, args.n, style=args.style, fmt=args.fmt, seed=args.seed,
                           shard_size=args.shard_size, overwrite=args.overwrite, progress=True, captions=args.captions)
        print(f"wrote {args.n} {args.style} images ({args.fmt}, seed {args.seed}, {args.captions} captions) to {out}")
        return 0

    p.set_defaults(run=run)


# --- train-classifier (owner: evaluate/classifier.py) -------------------------------------------------------
def _register_train_classifier(world_sub) -> None:
    from pathlib import Path

    from lcmkit_world.world import ASSETS

    shipped = ASSETS / "world-evaluator"
    p = world_sub.add_parser("train-classifier", help="train the world's attribute classifier (the evaluator)")
    p.add_argument("--out", default=str(shipped), help="output folder for model.safetensors + config.json "
                   "(default: the shipped evaluator's folder)")
    p.add_argument("--steps", type=int, default=2400, help="optimizer steps (default 2400)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--images", type=int, default=30_000, help="real images rendered into memory, half "
                   "filled, half outlined (default 30000)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="training images, init and batches (default 0)")
    p.add_argument("--eval-seed", type=int, default=10_000, help="seed of the fresh accuracy check (default 10000)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace a classifier already in --out")

    def run(args) -> int:
        import torch

        from lcmkit.errors import LcmkitError
        from lcmkit_world.evaluate.classifier import train_classifier

        if min(args.steps, args.batch_size, args.images) < 1:
            raise LcmkitError("--steps, --batch-size and --images must be positive")
        if (Path(args.out) / "model.safetensors").exists() and not args.overwrite:
            raise LcmkitError(f"{args.out} already holds a classifier (model.safetensors); pass --overwrite to "
                              "replace it or choose another --out")

        if args.threads:
            torch.set_num_threads(args.threads)
        accuracy = train_classifier(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                    n_images=args.images, lr=args.lr, eval_seed=args.eval_seed)
        print(f"saved to {args.out}; accuracy on fresh images: "
              + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
        return 0

    p.set_defaults(run=run)


# --- train-teacher (owner: lcmkit_world/teacher.py) ----------------------------------------------------------
def _register_train_teacher(world_sub) -> None:
    from lcmkit_world.teacher_config import TrainConfig

    d = TrainConfig()  # the defaults, read from the config (the help says them)
    p = world_sub.add_parser(
        "train-teacher", help="train the world's teacher (a tiny Stable Diffusion) and save it as a pipeline folder",
        description="Train the VAE, then the UNet + text encoder on cached latents; resumable; writes "
                    "OUT/pipeline (a StableDiffusionPipeline folder), OUT/loss.png, OUT/config.json, OUT/training.json.",
    )
    a = p.add_argument
    a("--out", required=True, help="output folder (checkpoints, caches, pipeline, plots)")
    a("--vae-steps", type=int, default=d.vae_steps, help=f"VAE training steps (default {d.vae_steps})")
    a("--vae-decoder-steps", type=int, default=d.vae_decoder_steps,
      help=f"decoder-only polish steps on the frozen encoder's latents (default {d.vae_decoder_steps})")
    a("--vae-batch-size", type=int, default=d.vae_batch_size, help=f"VAE batch size (default {d.vae_batch_size})")
    a("--vae-lr", type=float, default=d.vae_lr, help=f"VAE peak learning rate (default {d.vae_lr:g})")
    a("--unet-steps", type=int, default=d.unet_steps, help=f"UNet + text encoder steps (default {d.unet_steps})")
    a("--batch-size", type=int, default=d.batch_size, help=f"UNet batch size (default {d.batch_size})")
    a("--lr", type=float, default=d.lr, help=f"UNet + text encoder peak learning rate (default {d.lr:g})")
    a("--num-images", type=int, default=d.num_images,
      help=f"filled images rendered and cached (default {d.num_images})")
    channels = ",".join(str(c) for c in d.unet.block_out_channels)
    a("--unet-channels", default=channels, help=f"UNet block widths, comma-separated (default {channels})")
    a("--ema-decay", type=float, default=d.ema_decay, help=f"EMA decay of the saved weights (default {d.ema_decay})")
    a("--checkpoint-every", type=int, default=d.checkpoint_every,
      help=f"steps between checkpoints (default {d.checkpoint_every})")
    a("--threads", type=int, default=d.threads,
      help=f"torch intra-op CPU threads (default {d.threads}); use 1 on a machine other jobs keep busy: threads "
           "that wait for each other on busy cores can run ~10x slower")
    a("--outlined-images", type=int, default=d.outlined_images,
      help=f"outlined images added to the VAE's training set (default {d.outlined_images})")
    a("--no-vae-bf16", action="store_true", help="train the VAE in float32, not bfloat16 autocast")
    a("--unet-bf16", action="store_true", help="train the UNet under bfloat16 autocast")
    a("--warmup-steps", type=int, default=d.warmup_steps,
      help=f"learning-rate warm-up steps (default {d.warmup_steps})")
    a("--open-captions", type=float, default=d.open_captions,
      help="probability that a training caption is an open one, naming each of size, colour, position and "
           f"background with probability 1/2 ('a red circle'); default {d.open_captions:g}")
    a("--init-from", default=None,
      help="start from this teacher pipeline folder (its VAE is kept, only the UNet phase runs)")
    a("--seed", type=int, default=d.seed)
    a("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    a("--no-progress", action="store_true", help="no progress bar")

    def run(args) -> int:
        from lcmkit.errors import LcmkitError
        from lcmkit_world.teacher import TrainConfig, UNetConfig, train_teacher

        try:
            channels = tuple(int(c) for c in args.unet_channels.split(","))
        except ValueError:
            raise LcmkitError(f"--unet-channels takes comma-separated integers, got {args.unet_channels!r}")
        cfg = TrainConfig(
            out=args.out, vae_steps=args.vae_steps, vae_decoder_steps=args.vae_decoder_steps,
            vae_batch_size=args.vae_batch_size, vae_lr=args.vae_lr, unet_steps=args.unet_steps,
            batch_size=args.batch_size, lr=args.lr, num_images=args.num_images,
            unet=UNetConfig(block_out_channels=channels), ema_decay=args.ema_decay,
            outlined_images=args.outlined_images, checkpoint_every=args.checkpoint_every, threads=args.threads,
            vae_bf16=not args.no_vae_bf16, unet_bf16=args.unet_bf16, seed=args.seed,
            warmup_steps=args.warmup_steps, open_captions=args.open_captions, init_from=args.init_from,
        )
        pipeline = train_teacher(cfg, resume=args.resume, progress=not args.no_progress)
        print(f"saved the teacher pipeline to {pipeline}")
        return 0

    p.set_defaults(run=run)


# --- train-flow-teacher (owner: lcmkit_world/flow_teacher.py) ----------------------------------------------------
def _register_train_flow_teacher(world_sub) -> None:
    from lcmkit_world.teacher_config import FlowTrainConfig, TransformerConfig

    d, t = FlowTrainConfig(), TransformerConfig()  # the defaults (the help says them)
    p = world_sub.add_parser(
        "train-flow-teacher", help="train the world's flow-matching teacher (a tiny Stable Diffusion 3)",
        description="Train an SD3Transformer2DModel and two CLIP text encoders by rectified flow on the latents of "
                    "a world teacher's VAE; resumable; writes OUT/pipeline (a StableDiffusion3Pipeline folder, no "
                    "T5), OUT/loss.png, OUT/config.json, OUT/training.json.",
    )
    a = p.add_argument
    a("--out", required=True, help="output folder (checkpoints, caches, pipeline, plots)")
    a("--init-from", default=None, help="the world teacher folder whose VAE and tokenizer are kept (default: the "
      "shipped open-caption teacher)")
    a("--steps", type=int, default=d.unet_steps, help=f"transformer + text encoder steps (default {d.unet_steps})")
    a("--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    a("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    a("--warmup-steps", type=int, default=d.warmup_steps, help=f"learning-rate warm-up (default {d.warmup_steps})")
    a("--num-images", type=int, default=d.num_images, help=f"images rendered and cached (default {d.num_images})")
    a("--layers", type=int, default=t.num_layers, help=f"joint transformer blocks (default {t.num_layers})")
    a("--patch-size", type=int, default=t.patch_size, help=f"latent patch size (default {t.patch_size})")
    a("--shift", type=float, default=d.shift, help=f"the saved scheduler's sigma shift (default {d.shift:g})")
    a("--open-captions", type=float, default=d.open_captions,
      help=f"probability that a training caption is an open one (default {d.open_captions:g})")
    a("--ema-decay", type=float, default=d.ema_decay, help=f"EMA decay of the saved weights (default {d.ema_decay})")
    a("--checkpoint-every", type=int, default=d.checkpoint_every,
      help=f"steps between checkpoints (default {d.checkpoint_every})")
    a("--threads", type=int, default=d.threads, help=f"torch intra-op CPU threads (default {d.threads})")
    a("--seed", type=int, default=d.seed)
    a("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    a("--no-progress", action="store_true", help="no progress bar")

    def run(args) -> int:
        from lcmkit_world.flow_teacher import train_flow_teacher

        cfg = FlowTrainConfig(
            out=args.out, init_from=args.init_from, unet_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            warmup_steps=args.warmup_steps, num_images=args.num_images, shift=args.shift,
            transformer=TransformerConfig(num_layers=args.layers, patch_size=args.patch_size),
            open_captions=args.open_captions, ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
            threads=args.threads, seed=args.seed,
        )
        pipeline = train_flow_teacher(cfg, resume=args.resume, progress=not args.no_progress)
        print(f"saved the flow teacher pipeline to {pipeline}")
        return 0

    p.set_defaults(run=run)
