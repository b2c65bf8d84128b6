"""``lcmkit bench judge``: calibrate the strict judge, then show on held-out sets that it sees what a person sees.

1. **Calibration** (``--calibrate``; seed ``calibration_seed``): clean renders and their VAE reconstructions (the
   world teacher's VAE, posterior mean) of both styles are fitted (:func:`lcmkit_world.evaluate.metrics.read`);
   the minimum IoU of a well-formed shape per (shape, style, size class) is the ``quantile`` of those IoUs less
   ``margin``. Written to the evaluator's ``judge.json``.
2. **Validation** (seed ``validation_seed``, never used to calibrate): the strict verdict's rate on fresh clean
   renders and VAE reconstructions (should be ≥ 0.99), and its rejection rate on every kind of hard negative of
   :mod:`lcmkit_world.distort` in both styles (should be ≥ 0.95), beside the rejection rate of the classifier's
   attribute verdict alone (the judge before it judged form).
3. **World-FID**: the real-vs-real floor, VAE reconstructions and each distorted set against the real set, with the
   judge's features and with the classifier's alone.

Writes ``judge.json``, ``judge.md`` and contact sheets (``sheet-<set>.png``, verdicts on each tile) to ``out``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lcmkit.atomic import write_json, write_text
from lcmkit.errors import LcmkitError
from lcmkit_world import distort, world
from lcmkit_world.bench import machine


@dataclass
class JudgeOptions:
    out: str = "benchmarks/results/judge"
    num: int = 1000                   # clean renders (and their reconstructions) per style and split
    num_distorted: int = 300          # hard negatives per kind and style
    n_real: int = 2000                # real images of the world-FID reference
    calibration_seed: int = 50_000
    validation_seed: int = 60_000
    quantile: float = 0.002
    margin: float = 0.005
    calibrate: bool = False
    vae: str | None = None            # pipeline folder whose VAE makes the reconstructions (default: world-teacher)
    threads: int | None = None

    def __post_init__(self):
        if self.num < 50 or self.num_distorted < 20:
            raise LcmkitError("--num must be at least 50 and --num-distorted at least 20")
        if self.calibration_seed == self.validation_seed:
            raise LcmkitError("the validation seed must differ from the calibration seed")
        if not 0.0 <= self.quantile < 0.5 or self.margin < 0:
            raise LcmkitError("--quantile must be in [0, 0.5) and --margin >= 0")


def reconstruct(images: np.ndarray, vae, batch: int = 250) -> np.ndarray:
    """uint8 images through ``vae`` (encode, posterior mean, decode)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def calibrate(sets: list[tuple[np.ndarray, list]], quantile: float, margin: float, min_count: int = 30
              ) -> dict[str, float]:
    """Thresholds ``"shape/form/size"`` → minimum IoU, from images that must pass: per cell, the ``quantile`` of the
    fitted IoU with the prompted shape, less ``margin``. A cell with fewer than ``min_count`` images takes the
    limit of its (shape, form) over both sizes, then of its form over all shapes."""
    from lcmkit_world.evaluate import geometry, metrics

    ious: list[tuple[str, str, str, float]] = []
    for images, specs in sets:
        _, _, fitted, _ = metrics.read(images)
        shape = np.array([world.SHAPES.index(s.shape) for s in specs])
        rows = np.arange(len(specs))
        sizes = geometry.size_class(fitted["extent"][rows, shape])
        ious += [(s.shape, fitted["form"][i], sizes[i], float(fitted["iou"][i, shape[i]]))
                 for i, s in enumerate(specs)]

    def limit(match) -> float | None:
        values = [v for *key, v in ious if match(*key)]
        return round(float(np.quantile(values, quantile)) - margin, 4) if len(values) >= min_count else None

    out = {}
    for shape in world.SHAPES:
        for form in ("filled", "outlined", "outlined-open"):
            for size in world.SIZES:
                value = (limit(lambda a, b, c: (a, b, c) == (shape, form, size))
                         or limit(lambda a, b, c: (a, b) == (shape, form)) or limit(lambda a, b, c: b == form))
                if value is not None:
                    out[f"{shape}/{form}/{size}"] = value
    return out


def rates(images: np.ndarray, specs: list) -> dict:
    from lcmkit_world.evaluate import metrics

    j = metrics.judgements(images, specs)
    return {"strict": float(j["strict"].mean()), "attributes": float(j["attributes"].mean()),
            "well_formed": float(j["well_formed"].mean()), "fidelity": float(j["fidelity"].mean()), "judged": j}


def bench_judge(options: JudgeOptions, log=print) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from lcmkit_world.evaluate import geometry, metrics, sheet

    if options.threads:
        torch.set_num_threads(options.threads)
    out = Path(options.out)
    vae_dir = Path(options.vae) if options.vae else world.shipped_teacher("exact")
    vae = AutoencoderKL.from_pretrained(str(vae_dir), subfolder="vae", torch_dtype=torch.float32).eval()
    result = {"options": asdict(options), "machine": machine.machine_info(),
              "load_average": [round(v, 2) for v in os.getloadavg()]}

    if options.calibrate:
        log("[judge] calibrating on clean renders and VAE reconstructions …")
        sets = []
        for style in world.STYLES:
            images, specs = world.sample(options.num, seed=options.calibration_seed, style=style)
            sets += [(images, specs), (reconstruct(images, vae), specs)]
        limits = calibrate(sets, options.quantile, options.margin)
        write_json(geometry.THRESHOLDS_FILE, {
            "iou_thresholds": limits, "quantile": options.quantile, "margin": options.margin,
            "calibration": {"seed": options.calibration_seed, "num_per_style": options.num,
                            "sets": ["clean", "vae reconstruction"], "vae": str(vae_dir)}}, indent=2)
        result["thresholds"] = limits
    else:
        result["thresholds"] = {"/".join(k): v for k, v in geometry.thresholds().items()}

    log("[judge] validating on held-out sets …")
    accept, reject, sheets = {}, {}, {}
    for style in world.STYLES:
        images, specs = world.sample(options.num, seed=options.validation_seed, style=style)
        for name, x in (("clean", images), ("vae", reconstruct(images, vae))):
            r = rates(x, specs)
            sheets[f"{name}-{style}"] = (x, r.pop("judged"))
            accept[f"{name}/{style}"] = r
        for kind in distort.KINDS:
            x, kspecs = distort.sample(kind, options.num_distorted, seed=options.validation_seed, style=style)
            r = rates(x, kspecs)
            sheets[f"{kind}-{style}"] = (x, r.pop("judged"))
            reject[f"{kind}/{style}"] = {"strict_rejects": 1.0 - r["strict"],
                                         "attributes_alone_rejects": 1.0 - r["attributes"], **r}
    result["accept"], result["reject"] = accept, reject

    log("[judge] world-FID …")
    fid: dict[str, dict] = {}
    for style in world.STYLES:
        mu_r, sigma_r = metrics.real_statistics(options.n_real, style=style)
        real_a, real_specs = world.sample(options.n_real, seed=metrics.REAL_SEED, style=style)
        classifier_r = metrics.gaussian_stats(metrics.features_of(metrics.judgements(real_a, real_specs), False))
        entries = {"real-vs-real floor": metrics.fid_floor(options.n_real, style=style)}
        classifier_floor = metrics.gaussian_stats(metrics.features_of(metrics.judgements(
            *world.sample(options.n_real, seed=metrics.REAL_SEED, style=style, start=options.n_real)), False))
        classifier = {"real-vs-real floor": metrics.frechet_distance(*classifier_floor, *classifier_r)}
        for name in ["vae", *distort.KINDS]:
            x, j = sheets[f"{name}-{style}"]
            entries[name] = metrics.frechet_distance(*metrics.gaussian_stats(metrics.features_of(j)), mu_r, sigma_r)
            classifier[name] = metrics.frechet_distance(*metrics.gaussian_stats(metrics.features_of(j, False)),
                                                        *classifier_r)
        fid[style] = {"judge_features": entries, "classifier_features": classifier}
    result["world_fid"] = fid

    out.mkdir(parents=True, exist_ok=True)
    for name, (x, j) in sheets.items():
        if name.endswith("-filled") or name.startswith(("clean", "vae")):
            sheet.contact_sheet(x, j, out / f"sheet-{name}.png", title=name)
    write_json(out / "judge.json", result, indent=2)
    write_text(out / "judge.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    # a report table built line by line, as the demo's is: alike in shape, different columns and sources
    m = result["machine"]
    lines = ["# The strict judge on held-out sets", "",
             f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, load average at the start "
             f"{result['load_average']}. Seeds: calibration "
             f"{result['options']['calibration_seed']}, validation {result['options']['validation_seed']}.", "",
             "| set (held out) | style | strict verdict right | attributes alone right | well formed | fidelity (IoU) |",
             "|---|---|---|---|---|---|"]
    for key, r in result["accept"].items():
        name, style = key.split("/")
        lines.append(f"| {name} renders | {style} | {r['strict']:.3f} | {r['attributes']:.3f} | "
                     f"{r['well_formed']:.3f} | {r['fidelity']:.3f} |")
    lines += ["", "| hard negative | style | strict verdict rejects | attributes alone reject | fidelity (IoU) |",
              "|---|---|---|---|---|"]
    for key, r in result["reject"].items():
        kind, style = key.split("/")
        lines.append(f"| {kind} | {style} | {r['strict_rejects']:.3f} | {r['attributes_alone_rejects']:.3f} | "
                     f"{r['fidelity']:.3f} |")
    lines += ["", "World-FID against the real set (the judge's features: classifier + geometric descriptors; the "
                  "classifier's alone):", "", "| set | " + " | ".join(
                      f"{s} judge | {s} classifier" for s in result["world_fid"]) + " |",
              "|---|" + "---|---|" * len(result["world_fid"])]
    names = list(next(iter(result["world_fid"].values()))["judge_features"])
    for name in names:
        cells = [f"{v['judge_features'][name]:.2f} | {v['classifier_features'][name]:.2f}"
                 for v in result["world_fid"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Thresholds (minimum IoU with the ideal shape, per shape/style/size): "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["thresholds"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:  # python -m lcmkit_world.bench.judge [--calibrate]
    import sys

    opts = JudgeOptions(calibrate="--calibrate" in (argv or sys.argv[1:]))
    print(json.dumps({k: v for k, v in bench_judge(opts).items() if k in ("accept", "reject")}, indent=1,
                     default=str)[:4000])


if __name__ == "__main__":
    main()
