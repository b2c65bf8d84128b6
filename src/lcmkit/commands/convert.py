"""``lcmkit convert SRC --out DST``: a diffusers pipeline folder ↔ a single-file checkpoint (docs/single-file.md).

- SRC a pipeline folder (or a single file), DST ``*.safetensors``: the whole model in the original LDM/SGM layout,
  what ComfyUI, Forge, AUTOMATIC1111 and diffusers' ``from_single_file`` load
  (:func:`lcmkit.single_file_export.write_single_file`). A full LCM needs ``--guidance G`` (folded into the file)
  or ``--keep-w-embedding`` (a file only lcmkit reads back).
- SRC a single file, DST a folder: a diffusers pipeline folder (``save_pretrained``, safetensors).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from ._training import add_model_config_arg

    p = sub.add_parser("convert", help="diffusers pipeline folder <-> single-file .safetensors checkpoint",
                       description="Write a diffusers pipeline folder as one single-file checkpoint in the original "
                                   "LDM/SGM layout (--out FILE.safetensors), or a single-file checkpoint as a "
                                   "diffusers pipeline folder (--out DIR).")
    p.add_argument("source", metavar="SRC", help="diffusers pipeline folder or .safetensors single-file checkpoint")
    p.add_argument("--out", required=True, help="FILE.safetensors (single file) or DIR (pipeline folder)")
    add_model_config_arg(p)
    p.add_argument("--guidance", type=float, default=None,
                   help="full LCM only: the guidance scale g (ω = g − 1) folded into the file's time embedding, "
                        "exactly; the clients then run the LCM at that g with guidance 1 (no CFG)")
    p.add_argument("--keep-w-embedding", action="store_true",
                   help="full LCM only: keep the guidance embedding as model.diffusion_model.time_embed.cond_proj "
                        "(only lcmkit reads it back; other clients drop it)")
    p.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="weights' dtype in a single file (default: as loaded, float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args) -> int:
    from lcmkit.errors import LcmkitError

    out = Path(args.out)
    to_file = out.suffix.lower() == ".safetensors"
    if args.guidance is not None and args.keep_w_embedding:
        raise LcmkitError("--guidance and --keep-w-embedding exclude each other: fold one guidance scale into the "
                          "file, or keep the embedding")
    if args.guidance is not None and not (args.guidance >= 1.0 and args.guidance < float("inf")):
        raise LcmkitError(f"--guidance must be a finite number >= 1 (ω = g − 1 >= 0), got {args.guidance}")
    if not to_file and (args.guidance is not None or args.keep_w_embedding or args.save_dtype):
        raise LcmkitError("--guidance, --keep-w-embedding and --save-dtype apply to a single-file output "
                          "(--out FILE.safetensors)")
    if not to_file and out.suffix:
        raise LcmkitError(f"--out {out}: give a .safetensors file or a folder")
    if not out.parent.is_dir():
        raise LcmkitError(f"output folder {out.parent} does not exist; create it first")
    if to_file:
        if out.is_dir():
            raise LcmkitError(f"--out {out} is a folder; give a .safetensors file")
        if out.exists() and not args.overwrite:
            raise LcmkitError(f"--out {out} already exists; pass --overwrite to replace it")
    else:
        from lcmkit.task_arithmetic import check_out_dir

        if not Path(args.source).expanduser().is_file():
            raise LcmkitError(f"{args.source} is not a single-file checkpoint; to write a pipeline folder as a "
                              "single file, give --out FILE.safetensors")
        check_out_dir(out, args.overwrite)
    from lcmkit.pipelines import load_pipeline

    pipe = load_pipeline(args.source, device="cpu")
    if to_file:
        from lcmkit.single_file_export import write_single_file

        write_single_file(pipe, out, guidance=args.guidance, keep_w_embedding=args.keep_w_embedding,
                          save_dtype=args.save_dtype)
    else:
        from lcmkit.atomic import atomic_folder

        atomic_folder(out, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True))
    print(out)
    return 0
