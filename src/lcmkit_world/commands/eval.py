"""``lcmkit eval``: generate on the built-in world and score prompt accuracy, world-FID, style rate."""

from __future__ import annotations

from pathlib import Path

from lcmkit.commands._training import comma_list
from lcmkit.errors import LcmkitError
from lcmkit.options import FLOW_SAMPLER_NAMES, SAMPLER_NAMES


def register(sub) -> None:
    p = sub.add_parser("eval", help="score a model on the built-in world (accuracy, world-FID, style rate)",
                       description="Generate --num images per setting for prompts spread over the world's 540 "
                                   "captions and score them with the shipped attribute classifier.")
    p.add_argument("model", help="diffusers pipeline folder")
    p.add_argument("--sampler", type=comma_list(str), default=["lcm"],
                   help="sampler(s), comma-separated: lcm, tcd, ddim, dpm-solver, dpm-solver++; on flow models (SD3) lcm, "
                        "euler, heun (default lcm)")
    p.add_argument("--steps", type=comma_list(int), default=[1, 2, 4, 8], help="step counts, e.g. 1,2,4,8")
    p.add_argument("--guidance", type=comma_list(float), default=[7.5],
                   help="guidance scale(s), diffusers convention (ω = g − 1); default 7.5")
    p.add_argument("--num", type=int, default=1000, help="generations per setting (default 1000)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA(s), merged into the weights for the run and restored bit for bit afterwards")
    p.add_argument("--no-fuse-loras", dest="fuse_loras", action="store_false",
                   help="apply --lora with forward hooks instead of merging them into the weights (extra matmuls "
                        "every step; the same images up to float rounding)")
    p.add_argument("--eta", type=float, default=0.3, help="TCD gamma")
    p.add_argument("--style", choices=["filled", "outlined"], default="filled",
                   help="style the prompts ask for and world-FID compares with")
    p.add_argument("--prompts", choices=["exact", "open"], default="exact",
                   help="exact captions (all five attributes named) or open ones (the shape and a mix of subsets of "
                        "size, colour, position and background: the caption leaves the rest to the model)")
    p.add_argument("--teacher", help="teacher folder: adds the trajectory error against its 50-step ODE solution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--n-real", type=int, default=2000, help="real images for world-FID (default 2000)")
    p.add_argument("--out", required=True, help="output folder for eval.json, eval.md, grid.png")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.set_defaults(run=run)


def run(args) -> int:
    from lcmkit_world.evaluate.run import evaluate, markdown_table, settings_grid

    from lcmkit.flow_pipelines import folder_flow_family

    flow = folder_flow_family(args.model) is not None  # read from model_index.json: checked before any sampling
    names, kind = (FLOW_SAMPLER_NAMES, "a flow-matching") if flow else (SAMPLER_NAMES, "a UNet")
    bad = [s for s in args.sampler if s not in names]
    if bad:
        raise LcmkitError(f"unknown sampler {bad[0]!r} for {kind} model; use one of {', '.join(names)}")
    if any(n < 1 for n in args.steps):
        raise LcmkitError(f"steps must be positive integers, got {args.steps}")
    if args.batch_size < 1:
        raise LcmkitError("--batch-size must be positive")
    if args.n_real < 2:
        raise LcmkitError("--n-real must be at least 2")
    out = Path(args.out)
    if (out / "eval.json").exists() and not args.overwrite:
        raise LcmkitError(f"{out} already holds results (eval.json); pass --overwrite to replace them")
    result = evaluate(args.model, settings_grid(args.sampler, args.steps, args.guidance, args.eta), num=args.num,
                      seed=args.seed, loras=args.lora, style=args.style, n_real=args.n_real, teacher=args.teacher,
                      batch_size=args.batch_size, out_dir=out, prompts=args.prompts, fuse_loras=args.fuse_loras)
    print(markdown_table(result), end="")
    print(f"wrote {out / 'eval.md'}, {out / 'eval.json'} and {out / 'grid.png'}")
    return 0
