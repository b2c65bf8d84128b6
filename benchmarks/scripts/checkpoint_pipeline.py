"""An LCM pipeline folder from one checkpoint of a full-mode `lcmkit distill` run: the run's saved pipeline with
the UNet weights of that checkpoint's EMA target θ⁻ (what the run would have written had it stopped there).

Usage: python benchmarks/scripts/checkpoint_pipeline.py RUN_DIR STEP OUT_DIR
"""

import sys
from pathlib import Path

from safetensors.torch import load_file

from lcmkit.pipelines import load_pipeline
from lcmkit.train.checkpoint import CHECKPOINT_PREFIX, checkpoint_dirs

if __name__ == "__main__":
    run, step, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    found = {int(d.name[len(CHECKPOINT_PREFIX):]): d for d in checkpoint_dirs(run)}
    if step not in found:
        raise SystemExit(f"no complete checkpoint at step {step} under {run}; there are {sorted(found)}")
    pipe = load_pipeline(run / "pipeline", device="cpu")
    pipe.unet.load_state_dict(load_file(str(found[step] / "target.safetensors")))
    pipe.save_pretrained(out)
    print(f"wrote {out}")
