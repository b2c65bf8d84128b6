"""Evaluate a model on the built-in world: generate for prompts spread over all 540, score, tabulate.

One *setting* is (sampler, steps, guidance). For each, ``num`` images are generated for
:func:`lcmkit_world.world.eval_specs` prompts, image i with seed ``seed + i`` (the same prompts and initial noise
in every setting, so settings differ only by the method), then scored by :mod:`lcmkit_world.evaluate.metrics`.
With a teacher, the trajectory error compares each image with the teacher's 50-step DPM-Solver++ solution of
the same probability-flow ODE (same prompt, same initial noise, same guidance).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lcmkit.atomic import atomic_write, write_json, write_text
from lcmkit.errors import LcmkitError
from lcmkit.pipelines import applied_loras, generate, load_pipeline, save_grid
from lcmkit_world import world
from lcmkit_world.evaluate import metrics, sheet

TRAJECTORY_REFERENCE = ("dpm-solver++", 50)
#: tiles of each setting's contact sheet (the first prompts, the verdict drawn on each)
SHEET_TILES = 64


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    guidance: float
    eta: float = 0.3

    @property
    def name(self) -> str:
        return f"{self.sampler} {self.steps} steps, guidance {self.guidance:g}"


def settings_grid(samplers, steps, guidances, eta: float = 0.3) -> list[Setting]:
    """Every (sampler, steps, guidance) combination, in that nesting order."""
    return [Setting(s, int(n), float(g), eta) for s, n, g in itertools.product(samplers, steps, guidances)]


PROMPT_SETS = world.CAPTION_SETS


def eval_prompts(num: int, seed: int = 0, style: str = "filled", prompts: str = "exact"):
    """``(specs, named, captions)`` of the ``num`` evaluation prompts: specs spread over all 540
    (:func:`lcmkit_world.world.eval_specs`); ``prompts="exact"`` names all five attributes (``named`` is None),
    ``"open"`` names the shape and a seeded, even mix of subsets of the other four (:func:`world.eval_named`),
    so the caption leaves the rest of the image to the model."""
    if prompts not in PROMPT_SETS:
        raise LcmkitError(f"unknown prompt set {prompts!r}; use one of {', '.join(PROMPT_SETS)}")
    specs = world.eval_specs(num, seed=seed, style=style)
    named = world.eval_named(num, seed) if prompts == "open" else None
    captions = [world.caption(s, None if named is None else named[i]) for i, s in enumerate(specs)]
    return specs, named, captions


def sample_world(pipe, prompts: list[str], setting: Setting, seed: int = 0, batch_size: int = 100,
                 progress: bool = True) -> tuple[np.ndarray, float]:
    """uint8 images (N, 32, 32, 3) for ``prompts``, and the seconds per image it took.

    Image i uses prompt i and seed ``seed + i`` whatever the batch size.
    """
    from tqdm.auto import tqdm

    out = []
    start = time.perf_counter()
    for lo in tqdm(range(0, len(prompts), batch_size), desc=setting.name, disable=not progress, leave=False):
        chunk = prompts[lo:lo + batch_size]
        images = generate(pipe, chunk, steps=setting.steps, guidance=setting.guidance, seed=seed + lo,
                          height=world.IMAGE_SIZE, width=world.IMAGE_SIZE,
                          sampler=setting.sampler, eta=setting.eta, output_type="np", progress=False)
        out.append(np.round(images * 255).astype(np.uint8))
    seconds = (time.perf_counter() - start) / max(len(prompts), 1)
    return np.concatenate(out), seconds


def evaluate(model, settings: list[Setting], *, num: int = 1000, seed: int = 0, loras=(), style: str = "filled",
             n_real: int = metrics.N_REAL, teacher=None, batch_size: int = 100, grid_prompts: int = 8,
             out_dir: str | Path | None = None, progress: bool = True, prompts: str = "exact",
             fuse_loras: bool = True) -> dict:
    """Score ``model`` (a pipeline or folder) under each setting; write ``eval.json``, ``eval.md`` and
    ``grid.png`` (rows: settings; columns: the first ``grid_prompts`` prompts) to ``out_dir`` if given.

    ``style`` is the style the prompts ask for and the real set world-FID compares with ("outlined" for a
    model fine-tuned on the outlined set). ``teacher``: a pipeline or folder whose 50-step DPM-Solver++
    solution is the reference of the trajectory error. ``prompts``: ``exact`` captions or ``open`` ones
    (:func:`eval_prompts`); prompt accuracy counts the attributes a prompt names. ``loras`` are merged into the
    weights for the run and restored afterwards (:func:`lcmkit.pipelines.applied_loras`), or added by forward
    hooks with ``fuse_loras=False``.
    """
    if num < 2:
        raise LcmkitError(f"--num must be at least 2 (world-FID needs a covariance), got {num}")
    pipe = model if is_pipeline(model) else load_pipeline(model, flow=True)
    specs, named, captions = eval_prompts(num, seed, style, prompts)
    rows, grid_rows, sheets = [], [], []
    references = {}
    with applied_loras(pipe, loras, fuse=fuse_loras):
        for setting in settings:
            images, sec = sample_world(pipe, captions, setting, seed, batch_size, progress)
            judged = metrics.judgements(images, specs, named=named)
            scores = metrics.prompt_scores(images, specs, named=named, judged=judged)
            row = {"method": setting.sampler, "steps": setting.steps, "guidance": setting.guidance,
                   "eta": setting.eta if setting.sampler == "tcd" else None, "n": num,
                   "accuracy": scores["prompt"], "attributes": scores["attributes"],
                   "well_formed": scores["well_formed"], "fidelity": scores["fidelity"],
                   "world_fid": metrics.world_fid(images, n_real, style=style, judged=judged),
                   "style_rate": scores["style_rate"], "seconds_per_image": sec,
                   "per_attribute": {k: scores[k] for k in world.ATTRIBUTES}}
            sheets.append((setting, images[:SHEET_TILES], {k: v[:SHEET_TILES] for k, v in judged.items()
                                                           if k in ("strict", "attributes", "well_formed")},
                           scores["prompt"]))
            if teacher is not None:
                if setting.guidance not in references:
                    tpipe = teacher if is_pipeline(teacher) else load_pipeline(teacher, flow=True)
                    ref_setting = Setting(*TRAJECTORY_REFERENCE, setting.guidance)
                    references[setting.guidance] = sample_world(tpipe, captions, ref_setting, seed, batch_size,
                                                                progress)[0]
                row["trajectory_error"] = metrics.trajectory_error(images, references[setting.guidance])
            rows.append(row)
            grid_rows.append(images[:grid_prompts])
    result = {"rows": rows, "fid_floor": metrics.fid_floor(n_real, style=style), "n_real": n_real, "seed": seed,
              "style": style, "prompt_set": prompts, "settings": [asdict(s) for s in settings],
              "prompts": captions[:grid_prompts]}
    if out_dir is not None:
        write_outputs(result, grid_rows, Path(out_dir))
        for setting, images, judged, rate in sheets:
            sheet.contact_sheet(images, judged, Path(out_dir) / sheet_name(setting),
                                title=f"{setting.name}: strict {rate:.3f} of {num}")
    return result


def is_pipeline(model) -> bool:
    """A loaded pipeline (UNet or flow transformer), not a folder to load."""
    return hasattr(model, "unet") or hasattr(model, "transformer")


def sheet_name(setting: Setting) -> str:
    """File name of a setting's contact sheet: ``sheet-<sampler>-<steps>-g<guidance>.png``."""
    return f"sheet-{setting.sampler}-{setting.steps}-g{setting.guidance:g}.png"


def markdown_table(result: dict) -> str:
    has_traj = any("trajectory_error" in r for r in result["rows"])
    head = ("| method | steps | guidance | strict accuracy | attributes alone | well formed | world-FID | style rate |"
            " s/image |") + \
        (" trajectory error |" if has_traj else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        line = (f"| {r['method']} | {r['steps']} | {r['guidance']:g} | {r['accuracy']:.3f} | "
                f"{r.get('attributes', float('nan')):.3f} | {r.get('well_formed', float('nan')):.3f} | "
                f"{r['world_fid']:.2f} | {r['style_rate']:.3f} | {r['seconds_per_image']:.4f} |")
        if has_traj:
            line += f" {r.get('trajectory_error', float('nan')):.4f} |"
        lines.append(line)
    lines.append("")
    kind = ("open prompts (the shape and a mix of subsets of size, colour, position and background named; "
            "accuracy counts the named ones), specs spread over all 540"
            if result.get("prompt_set") == "open" else "prompts spread over all 540")
    lines.append(f"n = {result['rows'][0]['n']} generations per row, {kind} "
                 f"(seed {result['seed']}); world-FID against {result['n_real']} real {result['style']} images, "
                 f"real-vs-real floor {result['fid_floor']:.2f}.")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, grid_rows: list[np.ndarray], out_dir: Path) -> None:
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "eval.json", result, indent=2)
    write_text(out_dir / "eval.md", markdown_table(result))
    tiles = [Image.fromarray(im).resize((96, 96), Image.NEAREST) for row in grid_rows for im in row]
    atomic_write(out_dir / "grid.png", lambda tmp: save_grid(tiles, tmp, cols=max(len(r) for r in grid_rows)))
