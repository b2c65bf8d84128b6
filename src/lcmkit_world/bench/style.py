"""``lcmkit bench style``: a new style on the built-in world, by LCF and by LoRA task arithmetic.

The world teacher never saw outlined shapes (captions do not name the style). Given

- ``lcm``: the distilled full LCM, and ``lcf``: the same LCM fine-tuned on the outlined set (``lcmkit finetune``);
- ``style_lora``: a style LoRA trained on the teacher with the outlined set (``lcmkit lora train``);
- ``lcm_lora``: the teacher's LCM-LoRA (``lcmkit distill --mode lora``),

it scores, with the same prompts and initial noise in every row (:func:`lcmkit_world.evaluate.run.evaluate`, world-FID
against real *outlined* images):

- ``real``: real outlined images, the style rate the evaluator gives the real thing (the bars' reference);
- ``lcm`` and ``lcf`` at ``steps`` LCM steps (w-embedding of ω = guidance − 1);
- ``style-lora``: the teacher + style LoRA with DPM-Solver++ at ``teacher_steps`` and CFG (the style's reference);
- ``style-lora-control``: the teacher + style LoRA alone at ``steps`` LCM steps, no CFG: what the combinations
  must beat for the LCM-LoRA to be what makes the few steps work;
- ``lcm-lora``: the teacher + LCM-LoRA alone at ``steps`` (guidance baked in);
- ``combined λ1``: θ_pre + λ1·τ_style + λ2·τ_LCM (LCM-LoRA report, eq. 3), merged into the weights while sampling
  (restored afterwards), for each λ1.

:func:`bars` judges the rows against two relative thresholds: LCF needs style rate ≥ :data:`STYLE_RATE_BAR` × real
and accuracy ≥ :data:`ACCURACY_BAR` × the LCM's; the best combination needs the same style rate with accuracy ≥
:data:`ACCURACY_BAR` × the LCM-LoRA's alone, and is compared with ``style-lora-control`` on accuracy and world-FID.
Writes ``style.json``, ``style.md``, ``style.png`` (style rate and accuracy against λ1) and ``style_grid.png``
(rows: settings; columns: the first prompts).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lcmkit import atomic
from lcmkit.errors import LcmkitError
from lcmkit_world.bench import machine
from lcmkit_world.bench.quality import WorldScoring

STYLE = "outlined"
STYLE_RATE_BAR = 0.8     # × the real outlined images' style rate
ACCURACY_BAR = 0.85      # × the accuracy of the model before the style was added
GRID_PROMPTS = 8


@dataclass
class StyleOptions(WorldScoring):
    lcm: str | None = None
    lcf: str | None = None
    style_lora: str | None = None
    lcm_lora: str | None = None
    lambdas: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0, 1.2])
    lcm_lora_weight: float = 1.0          # λ2
    steps: int = 4
    teacher_steps: int = 25
    guidance: float = 7.5

    def smoke(self) -> "StyleOptions":
        """Tiny random models (built in a temp folder), 4 generations per row."""
        return replace(self, teacher=None, lcm=None, lcf=None, style_lora=None, lcm_lora=None, lambdas=[0.5, 1.0],
                       steps=2, teacher_steps=2, num=4, n_real=8, batch_size=4, device="cpu", is_smoke=True)


def smoke_models(work: Path) -> dict[str, str]:
    """:func:`lcmkit_world.bench.quality.smoke_models` (its LCM also stands in for the LCF output) plus a second random
    LoRA as the style LoRA."""
    from lcmkit_world.bench import configs, quality
    from lcmkit_world.bench.subjects import random_lora_file

    teacher, lcm, lcm_lora = quality.smoke_models(work)
    return {"teacher": teacher, "lcm": lcm, "lcf": lcm, "lcm_lora": lcm_lora,
            "style_lora": str(random_lora_file(configs.TINY.unet, work / "style", seed=1))}


def _models(options: StyleOptions) -> dict[str, str | None]:
    from lcmkit_world.bench.subjects import lora_file
    from lcmkit_world.world import shipped_teacher

    models = {"teacher": options.teacher or str(shipped_teacher(options.prompts)), "lcm": options.lcm, "lcf": options.lcf}
    for name in ("lcm", "lcf"):
        if models[name] is not None and not Path(models[name]).is_dir():
            raise LcmkitError(f"--{name} {models[name]} not found; pass a pipeline folder")
    models["style_lora"] = str(lora_file(options.style_lora, "style LoRA")) if options.style_lora else None
    models["lcm_lora"] = str(lora_file(options.lcm_lora)) if options.lcm_lora else None
    return models


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------

def real_row(options: StyleOptions) -> tuple[dict, np.ndarray]:
    """The evaluator on real outlined images of the same prompts the models get (jitter from a seed of its own,
    so they are not the world-FID reference set)."""
    from lcmkit_world import world
    from lcmkit_world.evaluate import metrics
    from lcmkit_world.evaluate.run import eval_prompts

    specs, named, _ = eval_prompts(options.num, options.seed, STYLE, options.prompts)
    rng = np.random.default_rng([options.seed, 7_000_001])
    images = np.stack([world.render(spec, rng) for spec in specs])
    scores = metrics.evaluate_world(images, specs, n_real=options.n_real, style=STYLE, named=named)
    row = {"name": "real", "model": "real outlined images", "sampler": None, "steps": None, "guidance": None,
           "loras": [], "n": options.num, "accuracy": scores["prompt"], "world_fid": scores["world_fid"],
           "style_rate": scores["style_rate"], "seconds_per_image": None}
    return row, images[:GRID_PROMPTS]


def score(options: StyleOptions, pipe, name: str, model: str, sampler: str, steps: int, guidance: float,
          loras: list[tuple[str, float]], work: Path, **extra) -> tuple[dict, np.ndarray]:
    """One setting through :func:`lcmkit_world.evaluate.run.evaluate` (prompts asking for the outlined style)."""
    from PIL import Image

    from lcmkit_world.evaluate.run import Setting, evaluate

    out = work / name.replace(" ", "-")
    result = evaluate(pipe, [Setting(sampler, steps, guidance)], num=options.num, seed=options.seed, loras=loras,
                      style=STYLE, n_real=options.n_real, batch_size=options.batch_size, grid_prompts=GRID_PROMPTS,
                      out_dir=out, progress=False, prompts=options.prompts)
    r = result["rows"][0]
    row = dict({"name": name, "model": model, "sampler": sampler, "steps": steps, "guidance": guidance,
                "loras": [{"file": str(f), "weight": w} for f, w in loras], "n": r["n"], "accuracy": r["accuracy"],
                "world_fid": r["world_fid"], "style_rate": r["style_rate"],
                "seconds_per_image": r["seconds_per_image"]}, **extra)
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    return row, grid


def style_rows(options: StyleOptions, models: dict, work: Path, log) -> tuple[list[dict], list[tuple[str, np.ndarray]]]:
    from lcmkit.pipelines import load_pipeline

    rows, grids = [], []

    def add(row_grid):
        row, grid = row_grid
        rows.append(row)
        grids.append((row["name"], grid))
        log(f"[style] {row['name']}: accuracy {row['accuracy']:.3f}, style rate {row['style_rate']:.3f}, "
            f"world-FID {row['world_fid']:.2f}")

    row, real = real_row(options)
    rows.append(row)
    grids.append(("real", np.concatenate(list(real), axis=1)))
    for name in ("lcm", "lcf"):
        if models[name]:
            add(score(options, load_pipeline(models[name], device=options.device), name, models[name], "lcm",
                      options.steps, options.guidance, [], work))
    teacher = load_pipeline(models["teacher"], device=options.device)
    style, lcm_lora = models["style_lora"], models["lcm_lora"]
    if style:
        add(score(options, teacher, "style-lora", models["teacher"], "dpm-solver++", options.teacher_steps,
                  options.guidance, [(style, 1.0)], work))
    if style:  # control: the style LoRA alone, sampled like the combinations (no LCM-LoRA, no CFG)
        add(score(options, teacher, "style-lora-control", models["teacher"], "lcm", options.steps, 1.0,
                  [(style, 1.0)], work))
    if lcm_lora:
        add(score(options, teacher, "lcm-lora", models["teacher"], "lcm", options.steps, 1.0,
                  [(lcm_lora, options.lcm_lora_weight)], work))
    if style and lcm_lora:
        for lam in options.lambdas:
            add(score(options, teacher, f"combined {lam:g}", models["teacher"], "lcm", options.steps, 1.0,
                      [(style, lam), (lcm_lora, options.lcm_lora_weight)], work, lambda_style=lam,
                      lambda_lcm=options.lcm_lora_weight))
    return rows, grids


# ---------------------------------------------------------------------------------------------------------------
# Bars
# ---------------------------------------------------------------------------------------------------------------

def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["name"] == name), None)


def _bar(name: str, row: dict, real_rate: float, reference: dict, reference_name: str) -> dict:
    style_need, acc_need = STYLE_RATE_BAR * real_rate, ACCURACY_BAR * reference["accuracy"]
    return {"bar": name, "row": row["name"], "style_rate": row["style_rate"], "style_rate_needed": style_need,
            "accuracy": row["accuracy"], "accuracy_needed": acc_need, "accuracy_reference": reference_name,
            "met": bool(row["style_rate"] >= style_need and row["accuracy"] >= acc_need)}


def bars(rows: list[dict]) -> list[dict]:
    """The LCF and task-arithmetic thresholds and the control comparison, from the rows (one whose rows are
    missing is left out)."""
    real = _row(rows, "real")
    out = []
    lcm, lcf = _row(rows, "lcm"), _row(rows, "lcf")
    if real and lcm and lcf:
        out.append(_bar("LCF", lcf, real["style_rate"], lcm, "lcm"))
    alone = _row(rows, "lcm-lora")
    combined = [r for r in rows if "lambda_style" in r]
    if real and alone and combined:
        judged = [_bar("task arithmetic", r, real["style_rate"], alone, "lcm-lora") for r in combined]
        # best: a combination that meets both bars with the highest accuracy, else the one closest to both
        met = [b for b in judged if b["met"]]
        best = max(met, key=lambda b: b["accuracy"]) if met else max(
            judged, key=lambda b: min(b["style_rate"] / max(b["style_rate_needed"], 1e-9),
                                      b["accuracy"] / max(b["accuracy_needed"], 1e-9)))
        out.append(best)
        control = _row(rows, "style-lora-control")
        if control:  # the premise of the bar: the LCM-LoRA is what makes the few steps work, not the sampler.
            # Judged on the combinations that meet the bar (all of them if none does): does one of them beat the
            # style LoRA alone on both accuracy and world-FID? Reported: the most accurate that does, else `best`.
            pool = [_row(rows, b["row"]) for b in (met or judged)]
            beating = [r for r in pool if r["accuracy"] > control["accuracy"] and r["world_fid"] < control["world_fid"]]
            chosen = max(beating, key=lambda r: r["accuracy"]) if beating else _row(rows, best["row"])
            out.append({"bar": "beats the control", "row": chosen["name"], "control": control["name"],
                        "accuracy": chosen["accuracy"], "control_accuracy": control["accuracy"],
                        "world_fid": chosen["world_fid"], "control_world_fid": control["world_fid"],
                        "met": bool(chosen["accuracy"] > control["accuracy"]
                                    and chosen["world_fid"] < control["world_fid"])})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------------------

def bench_style(options: StyleOptions, out_dir: str | Path, command: str, log=print) -> dict:
    from lcmkit.pipelines import resolve_device

    if options.num < 2 or options.steps < 1 or options.teacher_steps < 1:
        raise LcmkitError("--num must be at least 2, --steps and --teacher-steps positive")
    with tempfile.TemporaryDirectory(prefix="lcmkit-style-") as work:
        work = Path(work)
        models = smoke_models(work) if options.is_smoke else _models(options)
        rows, grids = style_rows(options, models, work, log)
    result = {"bench": "style", "command": command, "machine": machine.machine_info(resolve_device(options.device)),
              "options": asdict(options), "style": STYLE, "rows": rows, "bars": bars(rows)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine.write_json(out / "style.json", result)
    atomic.write_text(out / "style.md", markdown(result))
    plot_sweep(rows, out / "style.png")
    save_labelled_grid(grids, out / "style_grid.png")
    return result


def markdown(result: dict) -> str:
    text = machine.markdown_header("lcmkit bench style", result["machine"], result["command"])
    o = result["options"]
    text += (f"Prompts ask for the outlined style (the teacher never saw it); n = {o['num']} generations per row, "
             f"the same prompts and initial noise in every row; world-FID against real outlined images.\n\n")
    if o.get("prompts") == "open":
        text += ("Open prompts: each names the shape and a subset of size, colour, position and background; accuracy "
                 "counts the named attributes.\n\n")
    text += "## Bars\n\n"
    for b in result["bars"]:
        if "control" in b:
            text += (f"- **{'met' if b['met'] else 'not met'}** — a combination that meets the bar (`{b['row']}`) "
                     f"beats the style LoRA alone sampled the same way (`{b['control']}`, no LCM-LoRA): accuracy "
                     f"{b['accuracy']:.3f} vs {b['control_accuracy']:.3f}, world-FID {b['world_fid']:.2f} vs "
                     f"{b['control_world_fid']:.2f}\n")
            continue
        text += (f"- **{'met' if b['met'] else 'not met'}** — {b['bar']} (`{b['row']}`): style rate "
                 f"{b['style_rate']:.3f} (needs ≥ {b['style_rate_needed']:.3f}), prompt accuracy {b['accuracy']:.3f} "
                 f"(needs ≥ {b['accuracy_needed']:.3f} = {ACCURACY_BAR} × `{b['accuracy_reference']}`)\n")
    text += "\n## Rows\n\n"
    head = ["row", "sampler", "steps", "guidance", "LoRAs (λ)", "accuracy", "style rate", "world-FID", "s/image"]
    cells = [[r["name"], r["sampler"], r["steps"], r["guidance"],
              ", ".join(f"{Path(lo['file']).parent.name or lo['file']}:{lo['weight']:g}" for lo in r["loras"]) or None,
              r["accuracy"], r["style_rate"], r["world_fid"], r["seconds_per_image"]] for r in result["rows"]]
    return text + machine.table(head, cells)


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted((r for r in rows if "lambda_style" in r), key=lambda r: r["lambda_style"])
    real, alone = _row(rows, "real"), _row(rows, "lcm-lora")
    fig, ax = plt.subplots(figsize=(6, 4))
    if sweep:
        lams = [r["lambda_style"] for r in sweep]
        ax.plot(lams, [r["style_rate"] for r in sweep], marker="o", label="style rate (outlined)")
        ax.plot(lams, [r["accuracy"] for r in sweep], marker="s", label="prompt accuracy")
        if real:
            ax.axhline(STYLE_RATE_BAR * real["style_rate"], ls="--", c="C0", lw=0.8, label="style bar (0.8 × real)")
        if alone:
            ax.axhline(ACCURACY_BAR * alone["accuracy"], ls="--", c="C1", lw=0.8,
                       label="accuracy bar (0.85 × LCM-LoRA alone)")
        ax.set_xlabel("λ1 (style LoRA weight), λ2 = LCM-LoRA weight = %g" % sweep[0]["lambda_lcm"])
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"task arithmetic: style LoRA + LCM-LoRA, {sweep[0]['steps'] if sweep else '?'} steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_labelled_grid(grids: list[tuple[str, np.ndarray]], path: Path, label_width: int = 150) -> None:
    """Stack one strip per row (its first prompts, side by side), each labelled on the left."""
    from PIL import Image, ImageDraw

    from lcmkit_world.world import IMAGE_SIZE

    scale = 96 // IMAGE_SIZE
    strips = []
    for name, strip in grids:
        img = Image.fromarray(strip)
        if img.height == IMAGE_SIZE:  # raw 32-px images (the real row): enlarge like evaluate's grid
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        strips.append((name, img))
    width = label_width + max(img.width for _, img in strips)
    canvas = Image.new("RGB", (width, sum(img.height for _, img in strips)), "white")
    y = 0
    draw = ImageDraw.Draw(canvas)
    for name, img in strips:
        canvas.paste(img, (label_width, y))
        draw.text((6, y + img.height // 2 - 6), name, fill="black")
        y += img.height
    atomic.atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
