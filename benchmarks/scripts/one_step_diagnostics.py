"""Where a full LCM's one-step images go wrong, on open prompts.

1. Accuracy by how many attributes the prompt names (1 = the shape only … 5 = an exact caption): if one step
   failed because an open prompt leaves several modes (a blurred average of them), the failures would fall as
   the prompt names more.
2. The scaled-linear schedule's terminal SNR is not zero (ᾱ_999 ≈ 0.0047), so in training the top point
   z_999 = √ᾱ·z0 + σ·ε still carries a little of the data latent, while sampling starts from pure noise. The
   same prompts are sampled in one step from ε, from √ᾱ·z0 + σ·ε with z0 the encoded image of the prompt's own
   spec, and with z0 of the same spec in another colour. If the model read the answer from that leak, the first
   would be clearly worse than the second, and the third would pull colours away.

Usage: python benchmarks/scripts/one_step_diagnostics.py PIPELINE OUT_DIR [--num N]
Writes OUT_DIR/one_step.json and one_step.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from lcmkit.pipelines import load_pipeline
from lcmkit_world import world
from lcmkit_world.evaluate import metrics, run
from lcmkit_world.evaluate.classifier import as_model_input, predict, spec_labels


def encode(pipe, specs) -> torch.Tensor:
    """VAE latents (mean, × scaling factor) of the rendered images of ``specs``."""
    images = np.stack([world.render(s) for s in specs]).astype(np.float32) / 127.5 - 1
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def one_step(pipe, captions, latents, batch: int = 100) -> np.ndarray:
    out = []
    for lo in range(0, len(captions), batch):
        with torch.no_grad():
            images = pipe(captions[lo:lo + batch], num_inference_steps=1, guidance_scale=7.5,
                          latents=latents[lo:lo + batch], output_type="np").images
        out.append(np.round(images * 255).astype(np.uint8))
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline")
    p.add_argument("out")
    p.add_argument("--num", type=int, default=1000)
    args = p.parse_args()
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    specs, named, captions = run.eval_prompts(args.num, 0, "filled", "open")

    # 1. by the number of named attributes (the bench's own sampling: seed + i per image)
    images, _ = run.sample_world(pipe, captions, run.Setting("lcm", 1, 7.5, 0.3), 0, 100, False)
    by_named = {}
    for k in range(1, 6):
        idx = [i for i, n in enumerate(named) if len(n) == k]
        s = metrics.prompt_scores(images[idx], [specs[i] for i in idx], named=[named[i] for i in idx])
        by_named[k] = {"n": len(idx), "accuracy": s["prompt"]}

    # which colours the wrong ones are, where the prompt names the colour
    preds, _ = predict(metrics.load_evaluator(), as_model_input(images))
    labels, colours = spec_labels(specs), list(world.COLOURS)
    confusions = collections.Counter(
        f"{colours[labels['colour'][i]]} → {colours[preds['colour'][i]]}" for i, n in enumerate(named)
        if "colour" in n and preds["colour"][i] != labels["colour"][i])
    per_attribute = {a: metrics.prompt_scores(images, specs, named=named)[a] for a in world.ATTRIBUTES}

    # 2. the terminal-SNR leak
    abar = pipe.scheduler.alphas_cumprod[999].double()
    eps = torch.randn(args.num, pipe.unet.config.in_channels, *(2 * [pipe.unet.config.sample_size]),
                      generator=torch.Generator().manual_seed(0))
    other = [dataclasses.replace(s, colour=colours[(colours.index(s.colour) + 3) % len(colours)]) for s in specs]
    starts = {"pure noise ε": None, "leak of the prompt's own spec": encode(pipe, specs),
              "leak of the spec in another colour": encode(pipe, other)}
    leak = {}
    for name, z0 in starts.items():
        x = eps if z0 is None else (abar.sqrt() * z0 + (1 - abar).sqrt() * eps).float()
        s = metrics.prompt_scores(one_step(pipe, captions, x), specs, named=named)
        leak[name] = {"accuracy": s["prompt"], "colour": s["colour"], "shape": s["shape"]}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"pipeline": args.pipeline, "num": args.num, "guidance": 7.5, "alphas_cumprod_999": float(abar),
              "per_attribute": per_attribute, "accuracy_by_named_attributes": by_named,
              "colour_confusions": dict(confusions.most_common()), "terminal_snr_leak": leak}
    (out / "one_step.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# One-step diagnostics of `{args.pipeline}` ({args.num} open prompts, guidance 7.5)", "",
             "| attributes named | prompts | 1-step accuracy |", "|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['accuracy']:.3f} |" for k, v in by_named.items()]
    lines += ["", "Per attribute (over the prompts naming it): "
              + ", ".join(f"{a} {v:.3f}" for a, v in per_attribute.items()), "",
              f"Named colour drawn as another ({sum(confusions.values())} of "
              f"{sum('colour' in n for n in named)}), most frequent first: "
              + ", ".join(f"{k} ({v})" for k, v in confusions.most_common(8))]
    lines += ["", f"Start of the one step (ᾱ_999 = {float(abar):.4f}):", "",
              "| x_T | accuracy | colour | shape |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['accuracy']:.3f} | {v['colour']:.3f} | {v['shape']:.3f} |" for k, v in leak.items()]
    (out / "one_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
