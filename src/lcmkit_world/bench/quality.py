"""``lcmkit bench quality``: the LCM paper's Table 1 and its ablations, on the built-in world.

Three parts, each scored by :func:`lcmkit_world.evaluate.run.evaluate` (prompt accuracy and world-FID, ``num``
generations per row, the same prompts and initial noise in every row):

- ``table`` (``quality.json``): the teacher with DDIM / DPM-Solver / DPM-Solver++ at 1, 2, 4, 8, 25, 50 steps
  (CFG, guidance 7.5 = ω 6.5), the control (the undistilled teacher with the LCM sampler, guidance 1), the
  LCM-LoRA (guidance baked in: ``lora_guidance`` 1 by default) and the full LCM (w-embedding of ω 6.5) at 1, 2, 4,
  8 steps;
- ``skip`` (``ablation_skip.json``): for each skipping step k and teacher solver, one full-LCM distillation of
  ``budget`` steps, its checkpoints (θ⁻) evaluated at 4 LCM steps: quality against training steps (paper Fig. 3);
- ``guidance`` (``ablation_guidance.json``): the full LCM at 1, 2, 4, 8 steps for each ω (paper Fig. 4).

Rows: ``{"method", "solver", "steps", "guidance", "accuracy", "world_fid", "n"}`` (+ ``omega`` = guidance − 1,
``attributes``, ``well_formed``, ``fidelity``, ``seconds_per_image``; skip rows add ``skip`` and ``train_steps``).
``accuracy`` is the strict verdict (attributes right and the shape well formed). The table may be scored at several
evaluation seeds and pooled, and carry a ``reference`` row (the teacher at its best guidance, DPM-Solver++ 25) that
the quality bars are taken against (:mod:`lcmkit_world.bench.pooled`). ``quality.md`` tabulates them and states, from
the measured numbers, whether each qualitative claim of the paper holds here (:func:`claims`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lcmkit import atomic
from lcmkit.errors import LcmkitError
from lcmkit_world.bench import machine

TEACHER_SOLVERS = ("ddim", "dpm-solver", "dpm-solver++")
#: the teacher solvers of flow-matching teachers (SD3)
FLOW_TEACHER_SOLVERS = ("euler", "heun")
PARTS = ("table", "skip", "guidance")
METHODS = ("reference", "teacher", "control", "lcm-lora", "lcm")


@dataclass
class WorldScoring:
    """What the benches that score models on the world share (``bench quality``, ``bench style``)."""

    teacher: str | None = None         # world teacher folder; None = the shipped one
    num: int = 1000                    # generations per row
    n_real: int = 2000                 # real images for world-FID
    batch_size: int = 100
    seed: int = 0
    device: str = "auto"
    prompts: str = "exact"             # evaluation prompts: exact captions or open ones (evaluate.run.eval_prompts)
    is_smoke: bool = False


@dataclass
class QualityOptions(WorldScoring):
    lcm: str | None = None
    lora: str | None = None
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))  # table rows measured by this run
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 25, 50])
    teacher_solvers: list[str] = field(default_factory=lambda: list(TEACHER_SOLVERS))  # the table's teacher rows
    lcm_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    guidance: float = 7.5
    lora_guidance: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0])  # evaluation seeds of the table (pooled: bench.pooled)
    reference_guidance: float | None = None  # the teacher's best guidance: the reference row (DPM-Solver++ 25)
    sheets: bool = True                 # contact sheets (64 tiles, verdicts drawn) per table row, first seed
    budget: int = 1000
    evals: int = 4
    skips: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    solvers: list[str] = field(default_factory=lambda: list(TEACHER_SOLVERS))
    omegas: list[float] = field(default_factory=lambda: [2.0, 4.5, 7.5, 10.5, 14.0])
    ablation_steps: int = 4
    distill_batch_size: int = 32
    generated_samples: int = 10000

    def smoke(self) -> "QualityOptions":
        """Tiny random models (built in a temp folder), 4 generations per row, 2-step distillations. The skip
        ablation's budget, skips and solvers shrink only where they were left at their defaults."""
        default = QualityOptions()

        def pick(name, small):
            return small if getattr(self, name) == getattr(default, name) else getattr(self, name)

        return replace(self, teacher=None, lcm=None, lora=None, num=4, n_real=8, teacher_steps=[2],
                       lcm_steps=[2], budget=pick("budget", 2), evals=1, skips=pick("skips", [1, 50]),
                       solvers=pick("solvers", ["ddim", "dpm-solver++"]),
                       omegas=[2.0, 7.5], ablation_steps=2, distill_batch_size=2, generated_samples=4, batch_size=4,
                       device="cpu", is_smoke=True)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def smoke_models(work: Path) -> tuple[str, str, str]:
    """A tiny teacher and full LCM (pipeline folders) and an LCM-LoRA file, random weights."""
    from lcmkit_world.bench import configs
    from lcmkit_world.bench.subjects import random_lora_file

    teacher, lcm = work / "tiny-teacher", work / "tiny-lcm"
    configs.build_pipeline(configs.TINY).save_pretrained(str(teacher), safe_serialization=True)
    configs.build_pipeline(configs.TINY, full_lcm=True).save_pretrained(str(lcm), safe_serialization=True)
    lora = random_lora_file(configs.TINY.unet, work / "tiny-lora")
    return str(teacher), str(lcm), str(lora)


def teacher_dir(options: QualityOptions) -> str:
    from lcmkit_world.world import shipped_teacher

    folder = Path(options.teacher) if options.teacher else shipped_teacher(options.prompts)
    if not (folder / "model_index.json").is_file():
        raise LcmkitError(f"world teacher not found at {folder}; pass --teacher DIR (or --smoke)")
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation rows
# ---------------------------------------------------------------------------------------------------------------

def score(pipe, method: str, samplers, steps, guidances, options: QualityOptions, loras=(), seeds=None,
          sheets: Path | None = None, **extra) -> list[dict]:
    """Rows of ``method`` over the setting grid, at ``seeds`` (default ``[options.seed]``) pooled; the first seed's
    eval.json, grid and contact sheets go to ``sheets`` when given."""
    from lcmkit_world.bench.pooled import pool
    from lcmkit_world.evaluate.run import evaluate, settings_grid

    seeds = list(seeds) if seeds else [options.seed]
    per_seed = []
    for i, seed in enumerate(seeds):
        result = evaluate(pipe, settings_grid(samplers, steps, guidances), num=options.num, seed=seed,
                          loras=loras, n_real=options.n_real, batch_size=options.batch_size, progress=False,
                          prompts=options.prompts, out_dir=sheets if i == 0 else None)
        per_seed.append([{"method": method, "solver": r["method"], "steps": r["steps"], "guidance": r["guidance"],
                          "omega": r["guidance"] - 1.0, "accuracy": r["accuracy"], "attributes": r["attributes"],
                          "well_formed": r["well_formed"], "fidelity": r["fidelity"], "world_fid": r["world_fid"],
                          "n": r["n"], "seconds_per_image": r["seconds_per_image"], **extra}
                         for r in result["rows"]])
    return per_seed[0] if len(seeds) == 1 else pool(per_seed, seeds)


def _table_score(pipe, method, samplers, steps, guidances, options, sheets_root, **kw) -> list[dict]:
    """A table row group: at every evaluation seed, contact sheets under ``sheets_root/<method>``."""
    sheets = sheets_root / method if sheets_root is not None and options.sheets else None
    return score(pipe, method, samplers, steps, guidances, options, seeds=options.seeds, sheets=sheets, **kw)


def reference_solver(pipe) -> str:
    """The teacher's solver of the reference row: DPM-Solver++ for UNet teachers, Euler for flow-matching ones
    (their own scheduler, ``FlowMatchEulerDiscreteScheduler``)."""
    from lcmkit.flow_pipelines import flow_family

    return "euler" if flow_family(pipe) else "dpm-solver++"


def table_rows(options: QualityOptions, teacher: str, lcm: str | None, lora: str | None, log,
               sheets_root: Path | None = None) -> list[dict]:
    from lcmkit.pipelines import load_pipeline

    pipe = load_pipeline(teacher, device=options.device, flow=True)
    rows = []
    if "reference" in options.methods and options.reference_guidance is not None:
        solver = reference_solver(pipe)
        log(f"[quality] reference row (teacher, {solver} 25, guidance {options.reference_guidance:g}) …")
        rows += _table_score(pipe, "reference", [solver], [2 if options.is_smoke else 25],
                             [options.reference_guidance], options, sheets_root)
    if "teacher" in options.methods:
        log("[quality] teacher rows …")
        rows += _table_score(pipe, "teacher", options.solvers if options.is_smoke else options.teacher_solvers,
                             options.teacher_steps, [options.guidance], options, sheets_root)
    if "control" in options.methods:
        # no distillation: the teacher's own x̂0, sampled with the LCM sampler, no CFG. What distillation must beat
        log("[quality] control rows (teacher, LCM sampler, guidance 1) …")
        rows += _table_score(pipe, "control", ["lcm"], options.lcm_steps, [1.0], options, sheets_root)
    if lora and "lcm-lora" in options.methods:
        log("[quality] LCM-LoRA rows …")
        rows += _table_score(pipe, "lcm-lora", ["lcm"], options.lcm_steps, [options.lora_guidance], options,
                             sheets_root, loras=[lora])
    if lcm and "lcm" in options.methods:
        log("[quality] LCM rows …")
        rows += _table_score(load_pipeline(lcm, device=options.device), "lcm", ["lcm"], options.lcm_steps,
                             [options.guidance], options, sheets_root)
    return rows


def guidance_rows(options: QualityOptions, lcm: str | None, log) -> list[dict]:
    from lcmkit.pipelines import load_pipeline

    if not lcm:
        log("[quality] no --lcm: guidance ablation skipped")
        return []
    log("[quality] guidance ablation …")
    return score(load_pipeline(lcm, device=options.device), "lcm", ["lcm"], options.lcm_steps,
                 [w + 1.0 for w in options.omegas], options)


def distill_run(options: QualityOptions, teacher: str, skip: int, solver: str, out: Path) -> Path:
    """One full-LCM distillation of ``budget`` steps, a checkpoint every budget / evals steps (all kept)."""
    from lcmkit.train.config import build_config
    from lcmkit.train.distill import DistillConfig, distill

    every = max(1, options.budget // max(1, options.evals))
    cfg = build_config(DistillConfig, None, dict(
        teacher=teacher, data="world:open" if options.prompts == "open" else "world", out=str(out), mode="full",
        skip=skip, solver=solver, max_steps=options.budget,
        checkpoint_every=every, keep_checkpoints=options.budget // every + 1, validate_every=0,
        batch_size=options.distill_batch_size, generated_samples=options.generated_samples, seed=options.seed,
        progress=False, device="cpu" if options.device == "cpu" else "auto", overwrite=True))
    return distill(cfg)


def checkpoint_pipelines(result: Path, out: Path):
    """(train step, LCM pipeline with that checkpoint's θ⁻) for each checkpoint of a full-mode run."""
    from safetensors.torch import load_file

    from lcmkit.pipelines import load_pipeline
    from lcmkit.train.checkpoint import checkpoint_dirs

    pipe = load_pipeline(result, device="cpu")
    for folder in checkpoint_dirs(out):
        step = int(folder.name.split("-")[-1])
        pipe.unet.load_state_dict(load_file(str(folder / "target.safetensors")))
        yield step, pipe


def skip_rows(options: QualityOptions, teacher: str, work: Path, log) -> list[dict]:
    rows = []
    for solver in options.solvers:
        for k in options.skips:
            log(f"[quality] skip ablation: k={k}, {solver}, {options.budget} steps …")
            out = work / f"distill-k{k}-{solver}"
            result = distill_run(options, teacher, k, solver, out)
            for step, pipe in checkpoint_pipelines(result, out):
                rows += [dict(r, solver=solver, sampler="lcm") for r in
                         score(pipe, "lcm", ["lcm"], [options.ablation_steps], [options.guidance], options,
                               skip=k, train_steps=step)]
    return rows


def keep_other_skip_rows(part: dict, options: QualityOptions, out_dir: Path, log) -> None:
    """Skip-ablation runs of (solver, k) pairs this call did not make stay as an earlier call wrote them into
    ``out_dir``, when it used the same budget, checkpoints, scoring steps and prompts: the 15 runs of the ablation
    are an hour or more, and may be split over processes (``--solvers ddim`` in one, the DPM solvers in another).
    Rows are then ordered by solver, k and training step; the commands that made them are recorded."""
    path = out_dir / "ablation_skip.json"
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    same = ("budget", "evals", "ablation_steps", "prompts", "num", "seed")
    mismatch = [k for k in same if earlier.get("options", {}).get(k) != getattr(options, k)]
    if mismatch:
        log(f"[quality] earlier skip ablation in {out_dir} differs in {', '.join(mismatch)}: not merged")
        return
    ran = {(r["solver"], r["skip"]) for r in part["rows"]}
    kept = [r for r in earlier.get("rows", []) if (r["solver"], r["skip"]) not in ran]
    if not kept:
        return
    solvers = {name: i for i, name in enumerate(TEACHER_SOLVERS)}
    part["rows"] = sorted(kept + part["rows"], key=lambda r: (solvers.get(r["solver"], len(solvers)), r["skip"],
                                                              r["train_steps"]))
    commands = earlier.get("measured_by") or [earlier["command"]]
    part["measured_by"] = list(dict.fromkeys(commands + [part["command"]]))


# ---------------------------------------------------------------------------------------------------------------
# The paper's claims, judged from the measured rows
# ---------------------------------------------------------------------------------------------------------------

def _find(rows, **match):
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


def _claim(text: str, verdict: str, evidence: str) -> dict:
    return {"claim": text, "verdict": verdict, "evidence": evidence}


def claim_lcm_vs_dpmpp(rows: list[dict], steps: int = 2) -> dict:
    """LCM paper Table 1: LCM at 2 steps far ahead of DPM-Solver++ at 2 (paper FID over 5× lower; docs/reference.md,
    Published numbers)."""
    text = f"LCM at {steps} steps is far ahead of the teacher with DPM-Solver++ at {steps} (world-FID at most half, " \
           "higher prompt accuracy)"
    lcm = _find(rows, method="lcm", steps=steps)
    dpm = _find(rows, method="teacher", solver="dpm-solver++", steps=steps)
    if lcm is None or dpm is None:
        return _claim(text, "not measured", "rows missing")
    ok = lcm["world_fid"] <= 0.5 * dpm["world_fid"] and lcm["accuracy"] > dpm["accuracy"]
    return _claim(text, "agree" if ok else "disagree",
                  f"LCM: FID {lcm['world_fid']:.2f}, accuracy {lcm['accuracy']:.3f}; DPM-Solver++: FID "
                  f"{dpm['world_fid']:.2f}, accuracy {dpm['accuracy']:.3f}")


def claim_beats_control(rows: list[dict], steps: int = 1) -> dict:
    """Not a paper claim but the premise of every other one: the distilled models do better at ``steps`` than the
    undistilled teacher sampled the same way (LCM sampler, no CFG). Where they do not, the task is too easy for
    the table to show distillation."""
    text = f"the distilled models beat the undistilled teacher (LCM sampler, no CFG) at {steps} step(s)"
    control = _find(rows, method="control", steps=steps)
    models = [r for m in ("lcm", "lcm-lora") if (r := _find(rows, method=m, steps=steps)) is not None]
    if control is None or not models:
        return _claim(text, "not measured", "control or distilled rows missing")
    ok = all(r["accuracy"] > control["accuracy"] and r["world_fid"] < control["world_fid"] for r in models)
    return _claim(text, "agree" if ok else "disagree",
                  f"control: accuracy {control['accuracy']:.3f}, FID {control['world_fid']:.2f}; " + "; ".join(
                      f"{r['method']}: {r['accuracy']:.3f}, FID {r['world_fid']:.2f}" for r in models))


def _final(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(solver, k) → the row at the largest training step."""
    last: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["solver"], r["skip"])
        if key not in last or r["train_steps"] >= last[key]["train_steps"]:
            last[key] = r
    return last


def claim_k1_slow(rows: list[dict]) -> dict:
    """Ablation: k = 1 converges slowly — at the same budget its world-FID is worse than k = 20 (or the best k)."""
    text = "skipping step k = 1 converges slowly: at the same budget, worse world-FID than k = 20"
    final = _final(rows)
    verdicts, notes = [], []
    for solver in sorted({s for s, _ in final}):
        ks = {k: r["world_fid"] for (s, k), r in final.items() if s == solver}
        if 1 not in ks or len(ks) < 2:
            continue
        ref = 20 if 20 in ks else min((k for k in ks if k != 1), key=ks.get)
        verdicts.append(ks[1] > ks[ref])
        notes.append(f"{solver}: k=1 {ks[1]:.2f} vs k={ref} {ks[ref]:.2f}")
    if not verdicts:
        return _claim(text, "not measured", "k = 1 and another k needed")
    return _claim(text, "agree" if all(verdicts) else "disagree", "; ".join(notes))


def claim_ddim_large_k(rows: list[dict]) -> dict:
    """Ablation: at large k DDIM degrades while the DPM solvers hold (worse world-FID than each)."""
    final = _final(rows)
    ks = sorted({k for (s, k) in final if s == "ddim"} & {k for (s, k) in final if s != "ddim"})
    text = "at large k, DDIM is weaker than DPM-Solver and DPM-Solver++"
    if not ks:
        return _claim(text, "not measured", "DDIM and a DPM solver at a shared k needed")
    k = ks[-1]
    ddim = final[("ddim", k)]["world_fid"]
    others = {s: r["world_fid"] for (s, kk), r in final.items() if kk == k and s != "ddim"}
    ok = all(ddim > v for v in others.values())
    return _claim(f"{text} (k = {k})", "agree" if ok else "disagree",
                  f"DDIM {ddim:.2f}; " + "; ".join(f"{s} {v:.2f}" for s, v in sorted(others.items())))


def claim_guidance(rows: list[dict]) -> dict:
    """Fig. 4: a larger ω raises prompt alignment (CLIP score in the paper; prompt accuracy here)."""
    text = "a larger ω raises prompt accuracy (at most step counts)"
    by_steps: dict[int, list[dict]] = {}
    for r in rows:
        by_steps.setdefault(r["steps"], []).append(r)
    votes, notes = [], []
    for steps, group in sorted(by_steps.items()):
        lo, hi = min(group, key=lambda r: r["omega"]), max(group, key=lambda r: r["omega"])
        if lo is hi:
            continue
        votes.append(hi["accuracy"] > lo["accuracy"])
        notes.append(f"{steps} steps: ω {lo['omega']:g} → {lo['accuracy']:.3f}, ω {hi['omega']:g} → "
                     f"{hi['accuracy']:.3f} (FID {lo['world_fid']:.2f} → {hi['world_fid']:.2f})")
    if not votes:
        return _claim(text, "not measured", "two ω values needed")
    return _claim(text, "agree" if sum(votes) > len(votes) / 2 else "disagree", "; ".join(notes))


def claims(table: list[dict], skip: list[dict], guidance: list[dict]) -> list[dict]:
    return [claim_beats_control(table), claim_lcm_vs_dpmpp(table), claim_k1_slow(skip), claim_ddim_large_k(skip),
            claim_guidance(guidance)]


# ---------------------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------------------

def bench_quality(options: QualityOptions, out_dir: str | Path, command: str, log=print) -> dict:
    from lcmkit.pipelines import resolve_device

    known = TEACHER_SOLVERS + FLOW_TEACHER_SOLVERS
    unknown = [s for s in options.teacher_solvers if s not in known]
    if unknown or not options.teacher_solvers or not options.teacher_steps or min(options.teacher_steps) < 1:
        raise LcmkitError(f"--teacher-solvers takes any of {', '.join(known)} and --teacher-steps "
                          "positive step counts")
    bad = [p for p in options.parts if p not in PARTS]
    if bad:
        raise LcmkitError(f"unknown part {bad[0]!r}; use any of {', '.join(PARTS)}")
    if not options.methods or any(m not in METHODS for m in options.methods):
        raise LcmkitError(f"--methods takes any of {', '.join(METHODS)}, got {','.join(options.methods)!r}")
    from lcmkit_world.evaluate.run import PROMPT_SETS

    if options.prompts not in PROMPT_SETS:
        raise LcmkitError(f"--prompts takes {' or '.join(PROMPT_SETS)}, got {options.prompts!r}")
    if options.num < 2 or options.budget < 1 or options.evals < 1 or options.ablation_steps < 1:
        raise LcmkitError("--num must be at least 2, --budget, --evals and --ablation-steps positive")
    if not options.seeds or len(set(options.seeds)) != len(options.seeds):
        raise LcmkitError(f"--eval-seeds takes distinct seeds, got {options.seeds}")
    if "reference" in options.methods and options.reference_guidance is None and "table" in options.parts:
        options = replace(options, methods=[m for m in options.methods if m != "reference"])
    base = {"command": command, "machine": machine.machine_info(resolve_device(options.device)),
            "options": asdict(options)}
    with tempfile.TemporaryDirectory(prefix="lcmkit-quality-") as work:
        work = Path(work)
        if options.is_smoke:
            teacher, lcm, lora = smoke_models(work)
        else:
            teacher, lcm, lora = teacher_dir(options), options.lcm, None
            if options.lora:  # resolved up front: a lora/ folder is accepted, a wrong path fails before the hour
                from lcmkit_world.bench.subjects import (
                    lora_file,  # of teacher rows, not after
                )

                lora = str(lora_file(options.lora))
        sheets_root = Path(out_dir) / "sheets"
        table = table_rows(options, teacher, lcm, lora, log, sheets_root) if "table" in options.parts else []
        skip = skip_rows(options, teacher, work, log) if "skip" in options.parts else []
        guidance = guidance_rows(options, lcm, log) if "guidance" in options.parts else []
    from lcmkit_world.evaluate.metrics import fid_floor

    floor = fid_floor(options.n_real)
    out_dir = Path(out_dir)
    ran = {"quality": "table" in options.parts, "ablation_skip": "skip" in options.parts,
           "ablation_guidance": "guidance" in options.parts}
    result = {"quality": dict(base, bench="quality", rows=table, world_fid_floor=floor),
              "ablation_skip": dict(base, bench="ablation_skip", rows=skip, world_fid_floor=floor),
              "ablation_guidance": dict(base, bench="ablation_guidance", rows=guidance, world_fid_floor=floor)}
    # a part not run this time keeps the result an earlier run wrote in out_dir (its own command and machine):
    # the parts are minutes to hours each, and may be run one at a time
    for name, done in ran.items():
        if not done and (out_dir / f"{name}.json").is_file():
            result[name] = json.loads((out_dir / f"{name}.json").read_text())
    measured_by = {m: command for m in {r["method"] for r in table}}
    if ran["quality"] and (out_dir / "quality.json").is_file():
        # table rows of the methods this run did not measure stay as an earlier run wrote them (with its command):
        # e.g. a new LCM-LoRA re-scored with --methods lcm-lora keeps the hour of teacher rows
        earlier = json.loads((out_dir / "quality.json").read_text())
        kept = [r for r in earlier.get("rows", []) if r["method"] not in options.methods]
        for r in kept:
            measured_by.setdefault(r["method"], earlier.get("measured_by", {}).get(r["method"], earlier["command"]))
        order = {m: i for i, m in enumerate(METHODS)}
        result["quality"]["rows"] = sorted(kept + table, key=lambda r: order.get(r["method"], len(order)))
    if ran["quality"]:
        result["quality"]["measured_by"] = measured_by
    if ran["ablation_skip"]:
        keep_other_skip_rows(result["ablation_skip"], options, out_dir, log)
    from lcmkit_world.bench.pooled import bars

    result["quality"]["bars"] = bars(result["quality"]["rows"])
    result["quality"]["claims"] = claims(*(result[n]["rows"] for n in ("quality", "ablation_skip",
                                                                         "ablation_guidance")))
    write_outputs(result, out_dir, [n for n, done in ran.items() if done] + ["quality"])
    return result["quality"]


def markdown(result: dict) -> str:
    q = result["quality"]
    text = machine.markdown_header("lcmkit bench quality", q["machine"], q["command"])
    text += f"n = {q['options']['num']} generations per row; world-FID real-vs-real floor {q['world_fid_floor']:.2f}.\n\n"
    if q["options"].get("prompts") == "open":
        text += ("Open prompts: each names the shape and a subset of size, colour, position and background (an even "
                 "mix of the 16 subsets), so the caption leaves the rest of the image to the model; accuracy counts "
                 "the named attributes, world-FID compares with the whole world (the prompts' images are uniform over "
                 "it). Distillations of the skip ablation train on open captions (`world:open`).\n\n")
    text += "## Agreement with the LCM paper (judged from the numbers below)\n\n"
    text += "".join(f"- **{c['verdict']}**: {c['claim']}. {c['evidence']}\n" for c in q["claims"]) + "\n"
    head = ["method", "solver", "steps", "guidance", "accuracy (strict)", "attributes", "well formed", "fidelity",
            "world-FID", "s/image"]
    cells = lambda r: [r["method"], r["solver"], r["steps"], r["guidance"], r["accuracy"],  # noqa: E731
                       r.get("attributes", "—"), r.get("well_formed", "—"), r.get("fidelity", "—"), r["world_fid"],
                       r["seconds_per_image"]]
    text += "## Table 1 on the world\n\n" + machine.table(head, [cells(r) for r in q["rows"]]) + "\n"
    pooled = [r for r in q["rows"] if r.get("seeds")]
    if pooled:
        text += (f"Rows pooled over evaluation seeds {', '.join(map(str, pooled[0]['seeds']))} "
                 f"({pooled[0]['n']} generations each; ± = half the range of the per-seed accuracies). "
                 "Contact sheets of the first seed (64 tiles, the verdict drawn on each) are in `sheets/<method>/`.\n\n")
    from lcmkit_world.bench.pooled import bars_markdown

    bar_text = bars_markdown(q["rows"])
    if bar_text:
        text += "## Quality bars (against the reference row)\n\n" + bar_text + "\n"
    others = {m: c for m, c in q.get("measured_by", {}).items() if c != q["command"]}
    if others:
        text += "".join(f"Rows `{m}` measured by `{c}`.\n" for m, c in others.items()) + "\n"
    skip = result["ablation_skip"]
    text += f"## Skipping step k (quality at {skip['options']['ablation_steps']} LCM steps vs training steps)\n\n"
    text += _own_command(skip, q) + machine.table(
        ["k", "train steps"] + head, [[r["skip"], r["train_steps"]] + cells(r) for r in skip["rows"]]) + "\n"
    guidance = result["ablation_guidance"]
    text += "## Guidance ω (full LCM)\n\n" + _own_command(guidance, q)
    text += machine.table(["ω"] + head, [[r["omega"]] + cells(r) for r in guidance["rows"]])
    return text


def _own_command(part: dict, quality: dict) -> str:
    """A part measured by another run than the table says so, with that run's command(s) and n."""
    commands = part.get("measured_by") or [part["command"]]
    if commands == [quality["command"]]:
        return ""
    return (f"Measured by {' and '.join(f'`{c}`' for c in commands)} (n = {part['options']['num']} per row, "
            f"{part['machine']['date']}).\n\n")


def _axes(n: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, max(n, 1), figsize=(4.5 * max(n, 1), 6.5), squeeze=False)
    fig.suptitle(title)
    return plt, fig, axes


def _lines(ax_acc, ax_fid, groups: dict, x: str, xlabel: str, log_x: bool = False) -> None:
    for label, rows in groups.items():
        rows = sorted(rows, key=lambda r: r[x])
        ax_acc.plot([r[x] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
        ax_fid.plot([r[x] for r in rows], [r["world_fid"] for r in rows], marker="o", label=label)
    for ax, name in ((ax_acc, "prompt accuracy"), (ax_fid, "world-FID")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        if log_x:
            ax.set_xscale("log", base=2)
        if groups:
            ax.legend(fontsize=7)


def _group(rows: list[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def plot_table(rows: list[dict], path: Path) -> None:
    guidances = sorted({r["guidance"] for r in rows if r["method"] in ("teacher", "lcm")})
    plt, fig, axes = _axes(1, "Table 1 on the world (guidance " + ", ".join(f"{g:g}" for g in guidances) + ")")
    _lines(axes[0][0], axes[1][0], _group(rows, lambda r: f"{r['method']} {r['solver']}"), "steps", "steps", True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_skip(rows: list[dict], path: Path) -> None:
    solvers = sorted({r["solver"] for r in rows}) or ["none"]
    plt, fig, axes = _axes(len(solvers), "skipping step k: quality at a fixed budget")
    for i, solver in enumerate(solvers):
        group = _group([r for r in rows if r["solver"] == solver], lambda r: f"k={r['skip']}")
        _lines(axes[0][i], axes[1][i], group, "train_steps", "training steps")
        axes[0][i].set_title(solver)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_guidance(rows: list[dict], path: Path) -> None:
    plt, fig, axes = _axes(1, "guidance ω, full LCM")
    _lines(axes[0][0], axes[1][0], _group(rows, lambda r: f"{r['steps']} steps"), "omega", "ω")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path, names: list[str]) -> None:
    """JSON and PNG of the parts in ``names`` (quality.json always: its claims use every part); quality.md of all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"quality": plot_table, "ablation_skip": plot_skip, "ablation_guidance": plot_guidance}
    for name in dict.fromkeys(names):
        machine.write_json(out_dir / f"{name}.json", result[name])
        plots[name](result[name]["rows"], out_dir / f"{name}.png")
    atomic.write_text(out_dir / "quality.md", markdown(result))
