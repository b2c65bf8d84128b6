"""``lcmkit generate MODEL --prompt TEXT --out FILE.png ...``: parse, check the output, call
:func:`lcmkit.pipelines.generate`.

With ``--num-images N > 1`` the images go to FILE-0.png … FILE-{N-1}.png and a grid to FILE-grid.png.
Bad input becomes an :class:`~lcmkit.errors.LcmkitError` (one line, exit 2) before any model is loaded: the output
paths are checked here, the generation arguments by the library (:func:`lcmkit.options.check_generate_args`, the
first thing ``generate`` does).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lcmkit.options import ALL_SAMPLER_NAMES, DTYPE_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    from ._training import add_model_config_arg

    p = sub.add_parser("generate", help="generate images with an LCM, LCM-LoRA or base model",
                       description="Generate images from a local diffusers pipeline folder (SD 1.x/2.x, SDXL, LCM, "
                                   "SD3, FLUX.1).")
    p.add_argument("model", metavar="MODEL", help="diffusers pipeline folder (SD 1.x/2.x, SDXL, LCM, SD3/SD3.5, "
                                                  "FLUX.1), or a .safetensors single-file checkpoint (SD 1.x/2.x, "
                                                  "SDXL; see --model-config)")
    add_model_config_arg(p)
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt; needs real CFG (guidance > 1, not a full LCM nor FLUX.1-dev)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    p.add_argument("--guidance", type=float, default=None,
                   help="diffusers guidance_scale g (paper ω = g − 1; default 1); full LCM: w-embedding; FLUX.1-dev "
                        "(guidance-distilled): its guidance embedding, default 3.5; otherwise CFG when g > 1")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i, 0 … 2**64 − 1 (default 0)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--out", required=True, help="output PNG file (with several images: FILE-i.png + FILE-grid.png)")
    p.add_argument("--overwrite", action="store_true", help="replace output PNGs that already exist")
    p.add_argument("--num-images", type=int, default=1,
                   help=f"number of images (default 1); a grid is written for up to {MAX_GRID_IMAGES}")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per forward (default 8; fewer when they would not fit in memory); image i is the same "
                        "whatever the batch size")
    p.add_argument("--sampler", choices=ALL_SAMPLER_NAMES, default="lcm",
                   help="lcm / tcd (few-step), or the teacher baselines ddim / dpm-solver / dpm-solver++; flow models "
                        "(SD3, FLUX): lcm, or the teacher's euler / heun")
    p.add_argument("--eta", type=float, default=0.3, help="TCD gamma in [0, 1] (default 0.3)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a .safetensors LoRA, weight default 1.0; repeat for several (summed: task arithmetic); merged "
                        "into the weights for the run and restored bit for bit afterwards")
    p.add_argument("--no-fuse-loras", dest="fuse_loras", action="store_false",
                   help="apply --lora with forward hooks instead of merging them into the weights (extra matmuls "
                        "every step; the same images up to float rounding, and no copy of the changed weights)")
    p.add_argument("--init-image", default=None, help="image-to-image: the starting image")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img strength in (0, 1] (default 1.0); lcm/tcd shrink the 50-point grid to 50·strength; "
                        "flow models run the last int(steps·strength) steps")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    p.set_defaults(run=run)


#: Most images put in FILE-grid.png (a grid of thousands would be a picture of hundreds of megapixels).
MAX_GRID_IMAGES = 64


def output_paths(out: Path, num_images: int) -> tuple[list[Path], Path | None]:
    """(image paths, grid path or None): FILE.png alone, or FILE-0.png … and FILE-grid.png (up to
    :data:`MAX_GRID_IMAGES` images)."""
    if num_images == 1:
        return [out], None
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num_images)], \
        out.with_name(f"{out.stem}-grid{out.suffix}") if num_images <= MAX_GRID_IMAGES else None


def validate(args) -> None:
    """What only the command line has: the output files, the LoRA files and a model path that does not exist."""
    from lcmkit.errors import LcmkitError
    from lcmkit.pipelines import check_lora_file, parse_lora

    if args.strength is not None and args.init_image is None:
        raise LcmkitError("--strength needs --init-image")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise LcmkitError(f"--out must be a .png file, got {args.out}")
    if not out.parent.is_dir():
        raise LcmkitError(f"output folder {out.parent} does not exist; create it first")
    if isinstance(args.num_images, int) and args.num_images >= 1:
        paths, grid = output_paths(out, args.num_images)
        for p in (p for p in [*paths, grid] if p is not None):
            if p.is_symlink() and not p.exists():
                raise LcmkitError(f"{p} is a link to {os.readlink(p)}, which does not exist; lcmkit does not "
                                  "create a link's target: choose another --out")
            if p.exists() and not p.is_file():
                raise LcmkitError(f"{p} exists and is not a file (a folder?); --overwrite replaces only PNG files: "
                                  "choose another --out")
        existing = [p for p in [*paths, grid] if p is not None and p.exists()]
        if existing and not args.overwrite:
            raise LcmkitError(f"{existing[0]} already exists; pass --overwrite to replace it")
    for spec in args.lora:
        check_lora_file(parse_lora(spec)[0])
    if not Path(args.model).expanduser().exists() and args.model.startswith((".", "/", "~")):
        raise LcmkitError(f"model folder {args.model} not found; pass a local diffusers pipeline folder")


def run(args) -> int:
    validate(args)
    from lcmkit.atomic import atomic_write
    from lcmkit.pipelines import generate_batches, save_grid

    batches = generate_batches(
        args.model, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        seed=args.seed, num_images=args.num_images, height=args.height, width=args.width, sampler=args.sampler,
        eta=args.eta, loras=args.lora, fuse_loras=args.fuse_loras, init_image=args.init_image,
        strength=1.0 if args.strength is None else args.strength, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size,
    )
    paths, grid = output_paths(Path(args.out), args.num_images)
    done, kept = 0, []  # each batch is saved before the next is made: memory holds one batch (and the grid's images)
    for batch in batches:
        for image in batch:
            atomic_write(paths[done], lambda tmp: image.save(tmp, format="PNG"))
            print(paths[done], flush=True)
            done += 1
            if grid is not None:
                kept.append(image)
    if grid is not None:
        atomic_write(grid, lambda tmp: save_grid(kept, tmp))
        print(f"{grid} (grid of {len(kept)})")
    return 0
