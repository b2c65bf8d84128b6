"""``lcmkit lora ...``: LoRA tools.

- ``lcmkit lora combine BASE --lora FILE:λ [--lora FILE:λ ...] --out DIR [--overwrite]``: task arithmetic
  θ' = θ_pre + Σ λ_i τ_i (LCM-LoRA report eq. 3) merged into a standalone diffusers pipeline folder of the same
  class as BASE (safetensors), e.g. a style LoRA at 0.8 plus LCM-LoRA at 1.0. Owner: task_arithmetic.py.
- ``lcmkit lora train``: not yet (placeholder below; owner: the LoRA training recipe).
"""

from __future__ import annotations

import argparse

#: Written into every combined folder: what was merged, so the output documents itself.
PROVENANCE_FILE = "lcmkit_lora_combine.json"


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
    p.add_argument("base", metavar="BASE", help="diffusers pipeline folder to merge into")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:λ]",
                   help="a .safetensors LoRA and its weight λ (default 1.0); repeat for several")
    p.add_argument("--out", required=True, help="output pipeline folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing pipeline folder at --out (only one with a model_index.json)")
    p.set_defaults(run=run_combine)


def check_out_dir(out, overwrite: bool) -> None:
    """Refuse a non-empty --out without --overwrite; with it, only replace what is a pipeline folder."""
    from pathlib import Path

    from lcmkit.errors import LcmkitError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LcmkitError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LcmkitError(f"--out {out} is not empty; choose another folder or pass --overwrite")
        if not (out / "model_index.json").is_file():
            raise LcmkitError(f"--out {out} is not empty and is not a pipeline folder (no model_index.json); "
                              "refusing to delete it even with --overwrite")


def combine(base, loras, out, overwrite: bool = False) -> dict:
    """Load BASE, merge ``loras`` ([(file, λ)] or ``"FILE[:λ]"``) in place, save to ``out``. Returns the
    provenance record written next to the model (base, files, λ, layers per LoRA)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from lcmkit.lora_formats import check_safetensors_file, pipeline_models
    from lcmkit.pipelines import load_pipeline, parse_lora
    from lcmkit.task_arithmetic import load_lora_specs, merge_into_pipeline

    check_out_dir(out, overwrite)
    specs = [parse_lora(s) for s in loras]
    for path, _ in specs:  # refuse missing files and pickles before the (slow) base model loads
        check_safetensors_file(path)
    pipe = load_pipeline(base, device="cpu")
    weights = load_lora_specs(pipeline_models(pipe), specs)  # every file checked before any merge
    merge_into_pipeline(pipe, weights, inplace=True)

    out = Path(out)
    record = {
        "base": str(base), "pipeline_class": type(pipe).__name__,
        "formula": "theta' = theta_pre + sum_i lambda_i * (alpha_i / r_i) * up_i @ down_i",
        "loras": [{"file": str(path), "lambda": lam, "layers": len(w)} for (path, lam), (w, _) in zip(specs, weights)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # write next to --out, then swap in: a failed save never leaves half a folder where a good one was
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record


def run_combine(args) -> int:
    record = combine(args.base, args.lora, args.out, overwrite=args.overwrite)
    parts = ", ".join(f"{r['file']} × {r['lambda']:g} ({r['layers']} layers)" for r in record["loras"])
    print(f"merged {parts} into {record['pipeline_class']} at {args.out}")
    return 0


# --- train (owner: the LoRA training recipe) ------------------------------------------------------------------
def _register_train(lora_sub) -> None:
    """PLACEHOLDER for ``lcmkit lora train`` (another engineer fills it in): registers nothing yet."""
    return None
