"""``lcmkit bench memory``: the memory of one GPU during LCM distillation, per architecture × mode × precision ×
optimizer × gradient checkpointing × FSDP world size, and what fits on 24, 48 and 80 GB cards.

Everything batch- or shape-dependent is *measured*, not taken from a formula: one step of lcmkit's own recipe
(:mod:`.memtrack`: ``build_models``, ``lcd_loss``, backward, clipping, AdamW, EMA) runs on fake tensors, and every
storage allocated is counted. Per GPU, in bytes:

    peak = resident + max over phases p of working_p

- resident = student/S + target/S + teacher + text encoders + VAE + optimizer state/S, each the fake tensors' bytes
  (so in the dtype lcmkit gives it), with S = N under FSDP over N GPUs, else 1;
- optimizer state: AdamW as measured (exp_avg + exp_avg_sq in float32, 8 bytes per trainable parameter, and a
  step count per tensor); 8-bit AdamW (bitsandbytes) = 2 bytes per trainable parameter (its per-block absmax,
  ~1.6 % more, left out);
- working_p = the peak, during phase p, of the bytes allocated in the step and alive: activations kept for
  backward, temporaries, recomputation, plus gradients / N (the gradients of the trainable float32 weights);
  the AdamW phase (its foreach temporaries are parameter-sized) is divided by N whole; with 8-bit AdamW the update
  is in place and the phase costs what clipping does;
- FSDP (N > 1) adds what it gathers, in float32: the root's parameters (those in no unit) + 2 units (the one
  running and the one prefetched) to the student's and target's forwards, + 1 unit of unsharded gradients to
  backward (the replicated teacher gathers nothing)
  (:func:`.memtrack.fsdp_units`: a unit is a ResnetBlock2D or BasicTransformerBlock).

With cached latents (``--cache-latents``) the encode phase drops out of the max. A card "fits" a setting when
peak ≤ 0.9 × its memory (GiB): 10 % for the CUDA context, cuDNN / cuBLAS workspaces and the caching allocator's
fragmentation, which tensors do not show. The largest batch that fits is interpolated
linearly between the two measured batches (each phase's working bytes are linear in the batch).

The real check (``--checks``) takes one real step per setting in a fresh process on this machine and compares the
kernel's resident set (VmRSS / VmHWM) with the same estimate on CPU terms (CPU autocast, single-tensor AdamW).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lcmkit.errors import LcmkitError
from lcmkit_world.bench import machine
from lcmkit_world.bench.memtrack import PRECISIONS, StepSpec, run_step

GIB = 2**30
CARDS_GIB = (24, 48, 80)
USABLE = 0.9                 # share of a card's memory the estimate may use
EIGHT_BIT_STATE_BYTES = 2    # bitsandbytes AdamW8bit: two uint8 moments per parameter
OPTIMIZERS = ("adamw", "adamw8bit")
MAX_BATCH = 256              # the largest batch reported ("256" reads "256 or more")
REFERENCE_BATCH = 12         # diffusers' LCM / LCM-LoRA example commands (SD 1.5 at 512², SDXL at 1024²)
#: the checks that fit this machine (~6 GiB): the world teacher's shapes, large batch (activations dominate), and
#: SD 1.5's architecture with a bfloat16 frozen UNet at 256² (weights dominate)
DEFAULT_CHECKS = ["world-full-fp32-b256", "world-lora-fp32-b256", "world-full-bf16-b256", "sd15-lora-bf16-b2-r256",
                  "sd15-lora-bf16-b2-r256-ckpt"]
SMOKE_CHECKS = ["tiny-full-fp32-b2", "tiny-lora-bf16-b2-ckpt"]


@dataclass
class MemoryOptions:
    archs: list[str] = field(default_factory=lambda: ["sd15", "ssd1b", "sdxl"])
    modes: list[str] = field(default_factory=lambda: ["full", "lora"])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    batch: int = REFERENCE_BATCH
    fit_batch: int = 1               # the second measured batch, for the largest batch that fits
    resolution: int | None = None    # default each architecture's own (512 SD 1.5, 1024 SDXL / SSD-1B)
    world_sizes: list[int] = field(default_factory=lambda: [1, 8])
    lora_rank: int = 64
    solver: str = "ddim"
    checks: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKS))
    threads: int | None = None


# ---------------------------------------------------------------------------------------------------------------
# Per GPU: resident + the largest phase
# ---------------------------------------------------------------------------------------------------------------

def per_gpu(m: dict, optimizer: str, world: int) -> dict:
    """Bytes on one GPU for measurement ``m`` (:func:`.memtrack.run_step`) with ``optimizer`` over ``world`` GPUs:
    the resident parts, each phase's working bytes, the peak and the phase it is in (module docstring)."""
    if optimizer not in OPTIMIZERS:
        raise LcmkitError(f"unknown optimizer {optimizer!r}; use {', '.join(OPTIMIZERS)}")
    r, n = m["resident_bytes"], world
    state = r["optimizer"] if optimizer == "adamw" else EIGHT_BIT_STATE_BYTES * m["trainable_params"]
    resident = {"student": r["student"] / n, "target": r["target"] / n, "teacher": r["teacher"],
                "text_encoders": r["text_encoders"], "vae": r["vae"], "optimizer": state / n}
    if str(n) not in m["phase_peak_bytes"]:
        raise LcmkitError(f"measurement has no gradient peaks for {n} GPUs (has {sorted(m['phase_peak_bytes'])})")
    working = dict(m["phase_peak_bytes"][str(n)])
    working["adamw"] = m["phase_peak_bytes"]["1"]["adamw"] / n if optimizer == "adamw" else working["clip"]
    if n > 1:
        units = m["fsdp_units"]
        gathered = 4 * (units["root_params"] + 2 * units["max_params"])
        for phase in ("target", "student"):
            working[phase] += gathered
        working["backward"] += gathered + 4 * units["max_params"]
    peak_phase = max(working, key=working.get)
    cached = {p: v for p, v in working.items() if p != "encode"}
    total = sum(resident.values())
    return {"resident": resident, "working": working, "grads": m["grad_bytes"] / n,
            "activations": m["activation_bytes"], "peak_phase": peak_phase, "peak": total + working[peak_phase],
            "peak_cached_latents": total + max(cached.values())}


def max_batch(m_ref: dict, m_fit: dict, optimizer: str, world: int, budget: float, cached: bool = False) -> int:
    """The largest batch whose peak ≤ ``budget`` bytes, each phase's working bytes linear in the batch through the
    two measurements (0: not even one sample fits)."""
    a, b = per_gpu(m_fit, optimizer, world), per_gpu(m_ref, optimizer, world)
    b1, b2 = m_fit["spec"]["batch"], m_ref["spec"]["batch"]
    room = budget - sum(b["resident"].values())
    best = MAX_BATCH
    for phase, w2 in b["working"].items():
        if cached and phase == "encode":
            continue
        slope = (w2 - a["working"][phase]) / (b2 - b1)
        base = w2 - slope * b2
        if slope <= 0:
            best = best if base <= room else 0
        else:
            best = min(best, int((room - base) // slope))
    return min(max(best, 0), MAX_BATCH)


def fits(peak: float, card_gib: int) -> bool:
    return peak <= USABLE * card_gib * GIB


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------

def _spec(options: MemoryOptions, arch: str, mode: str, precision: str, ckpt: bool, batch: int) -> StepSpec:
    return StepSpec(arch, mode, precision, ckpt, batch, options.resolution, options.solver, options.lora_rank)


def measure_all(options: MemoryOptions, log=print) -> list[dict]:
    """Fake-tensor steps for every (arch, mode, precision, checkpointing) at ``batch`` and ``fit_batch``."""
    for name, values, allowed in (("mode", options.modes, ("full", "lora")),
                                  ("precision", options.precisions, tuple(PRECISIONS))):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise LcmkitError(f"unknown {name} {bad[0]!r}; use {', '.join(allowed)}")
    if options.batch <= options.fit_batch or options.fit_batch < 1:
        raise LcmkitError(f"need batch > fit_batch >= 1, got {options.batch} and {options.fit_batch}")
    shards = tuple(sorted({1, *options.world_sizes}))
    out = []
    for arch in options.archs:
        for mode in options.modes:
            for precision in options.precisions:
                for ckpt in (False, True):
                    for batch in (options.batch, options.fit_batch):
                        spec = _spec(options, arch, mode, precision, ckpt, batch)
                        log(f"[memory] {arch} {mode} {precision} ckpt={ckpt} batch {batch} (fake tensors) …")
                        out.append(run_step(spec, fake=True, grad_shards=shards))
    return out


def _key(m: dict) -> tuple:
    s = m["spec"]
    return s["arch"], s["mode"], s["precision"], s["checkpointing"]


def table_rows(measurements: list[dict], options: MemoryOptions) -> list[dict]:
    """One row per (arch, mode, precision, optimizer, checkpointing, world size) at the reference batch."""
    ref = {_key(m): m for m in measurements if m["spec"]["batch"] == options.batch}
    fit = {_key(m): m for m in measurements if m["spec"]["batch"] == options.fit_batch}
    rows = []
    for key, m in ref.items():
        for optimizer in OPTIMIZERS:
            for world in options.world_sizes:
                g = per_gpu(m, optimizer, world)
                arch, mode, precision, ckpt = key
                rows.append({"arch": arch, "mode": mode, "precision": precision, "optimizer": optimizer,
                             "checkpointing": ckpt, "world_size": world, "batch": m["spec"]["batch"],
                             "resolution": m["resolution"], "trainable_params": m["trainable_params"], **g,
                             "fits_gib": {str(c): fits(g["peak"], c) for c in CARDS_GIB},
                             "fits_gib_cached_latents": {str(c): fits(g["peak_cached_latents"], c) for c in CARDS_GIB},
                             "max_batch": {str(c): max_batch(m, fit[key], optimizer, world, USABLE * c * GIB)
                                           for c in CARDS_GIB},
                             "max_batch_cached_latents": {str(c): max_batch(m, fit[key], optimizer, world,
                                                                            USABLE * c * GIB, cached=True)
                                                          for c in CARDS_GIB}})
    return rows


def _preference(choice: tuple[dict, bool]) -> tuple:
    """Order among settings that fit: fewer GPUs, then no checkpointing (faster), then AdamW (exact), then
    per-step encoding (no crop / flip constraint), then bf16 (faster than fp32)."""
    row, cached = choice
    return row["world_size"], row["checkpointing"], row["optimizer"] != "adamw", cached, row["precision"] != "bf16"


def describe(row: dict, cached: bool = False) -> str:
    parts = [row["precision"], "8-bit AdamW" if row["optimizer"] == "adamw8bit" else "AdamW"]
    if row["checkpointing"]:
        parts.append("checkpointing")
    if cached:
        parts.append("cached latents")
    if row["world_size"] > 1:
        parts.append(f"FSDP×{row['world_size']}")
    return " + ".join(parts)


#: the leanest one-GPU setting, whose largest batch per card the headline gives
LEANEST = {"precision": "bf16", "optimizer": "adamw8bit", "checkpointing": True, "world_size": 1}


def headline(rows: list[dict]) -> dict:
    """Per (arch, mode) and card: the preferred setting (:func:`_preference`; cached latents = the peak without
    the encode phase) that fits at the reference batch, and the largest batch of :data:`LEANEST` with cached
    latents."""
    out: dict = {}
    for row, cached in sorted(((r, c) for r in rows for c in (False, True)), key=_preference):
        entry = out.setdefault(f"{row['arch']}/{row['mode']}", {str(c): None for c in CARDS_GIB})
        fit = row["fits_gib_cached_latents" if cached else "fits_gib"]
        for c in CARDS_GIB:
            if entry[str(c)] is None and fit[str(c)]:
                entry[str(c)] = {"setting": describe(row, cached),
                                 "peak_gib": row["peak_cached_latents" if cached else "peak"] / GIB}
    for row in rows:
        if all(row[k] == v for k, v in LEANEST.items()):
            out[f"{row['arch']}/{row['mode']}"]["leanest_one_gpu_max_batch"] = row["max_batch_cached_latents"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The check against real peaks on this machine
# ---------------------------------------------------------------------------------------------------------------

def parse_check(text: str) -> dict:
    """``arch-mode-precision-bBATCH[-rRESOLUTION][-ckpt]`` → a step spec (dict)."""
    words = text.split("-")
    if len(words) < 4 or not words[3].startswith("b"):
        raise LcmkitError(f"check {text!r}: write arch-mode-precision-bBATCH[-rRES][-ckpt], "
                          "e.g. sd15-lora-bf16-b2-r256")
    spec = {"arch": words[0], "mode": words[1], "precision": words[2], "batch": int(words[3][1:])}
    for w in words[4:]:
        if w == "ckpt":
            spec["checkpointing"] = True
        elif w.startswith("r"):
            spec["resolution"] = int(w[1:])
        else:
            raise LcmkitError(f"check {text!r}: unknown part {w!r}")
    if spec["mode"] not in ("full", "lora") or spec["precision"] not in PRECISIONS:
        raise LcmkitError(f"check {text!r}: mode full|lora, precision {'|'.join(PRECISIONS)}")
    return spec


def check(name: str, threads: int | None) -> dict:
    """Estimate (fake tensors, CPU terms) against one real step in a fresh process; ratios measured / estimated."""
    spec = parse_check(name)
    cpu_spec = StepSpec(**dict(spec, cuda_autocast=False, foreach=False))
    estimate = run_step(cpu_spec, fake=True, grad_shards=(1,))
    args = [sys.executable, "-m", "lcmkit_world.bench.memtrack", json.dumps(spec)] + ([str(threads)] if threads else [])
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LcmkitError(f"memory check {name} failed: " + " | ".join((proc.stderr or proc.stdout).splitlines()[-3:]))
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    resident = sum(estimate["resident_bytes"].values()) / mib
    working = max(estimate["phase_peak_bytes"]["1"].values()) / mib
    tracked = max(real["phase_peak_bytes"]["1"].values()) / mib
    rss = real["rss"]
    models, step = rss["models_mb"] - rss["start_mb"], rss["step_peak_mb"] - rss["models_mb"]
    return {"check": name, "spec": spec, "estimate_resident_mib": resident, "estimate_step_mib": working,
            "real_tracked_step_mib": tracked, "rss": rss, "rss_models_mib": models, "rss_step_mib": step,
            "ratio_models": models / resident, "ratio_step": step / working,
            "ratio_total": (models + step) / (resident + working), "ratio_tracked_step": tracked / working}


# ---------------------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------------------

ASSUMPTIONS = {
    "batch_resolution": f"per GPU, batch {REFERENCE_BATCH} (unless --batch-size) at the architecture's resolution "
                        "(512² SD 1.5, 1024² SDXL / SSD-1B): diffusers' LCM and LCM-LoRA example commands "
                        "(examples/consistency_distillation)",
    "step": "lcmkit distill's step: encode images (VAE mean) and captions per step (its default), DDIM teacher "
            "with batched CFG (2B), target, student with autograd, backward, clipping, optimizer, EMA; 'cached "
            "latents' (--cache-latents) = the same without the encode phase (text encoders and VAE stay resident)",
    "fp32": "everything float32 (lcmkit --mixed-precision no)",
    "bf16": "lcmkit --mixed-precision bf16: frozen teacher (LoRA: the base UNet), text encoders and VAE in bf16; "
            "trainable weights (full: the student; LoRA: the adapters), EMA target, gradients and AdamW state in "
            "float32; student / target forwards under bf16 autocast with CUDA's policy (norms in float32). lcmkit "
            "has no pure-bf16 mode",
    "lora": "one UNet: teacher = adapters off, target = online adapters (no EMA), rank 64",
    "full": "student (with w-embedding) + EMA target (float32 copy) + a separate frozen teacher",
    "adamw": "torch AdamW, foreach (CUDA default): 2 float32 moments + a step per tensor, a parameter-sized temporary",
    "adamw8bit": "bitsandbytes AdamW8bit: 2 bytes per trainable parameter, in-place update (absmax ~1.6 % left out)",
    "fsdp": "projection (lcmkit has no FSDP yet): student, gradients, optimizer state and EMA target sharded by N; "
            "teacher, text encoders and VAE replicated; all-gather of root + 2 units (+1 unit of gradients in "
            "backward) in float32; activations per GPU unchanged",
    "fits": f"peak ≤ {USABLE:g} × card memory (GiB), the rest for CUDA context, workspaces and fragmentation",
    "attention": "fused SDPA (no N² matrix), as flash / memory-efficient attention on CUDA",
}


def bench_memory(options: MemoryOptions, out_dir: str | Path, command: str, log=print) -> dict:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    for name in options.checks:  # refuse a bad spelling before the long part
        parse_check(name)
    measurements = measure_all(options, log)
    rows = table_rows(measurements, options)
    checks = []
    for name in options.checks:
        log(f"[memory] check {name}: estimate and one real step …")
        checks.append(check(name, options.threads))
    result = {"bench": "memory", "command": command, "machine": machine.machine_info(torch.device("cpu")),
              "options": asdict(options), "assumptions": ASSUMPTIONS, "activation_method":
              "one lcmkit distillation step on FakeTensorMode tensors; a TorchDispatchMode counts the bytes of every "
              "new storage and frees them by weakref (lcmkit_world.bench.memtrack.LiveBytes)",
              "cards_gib": list(CARDS_GIB), "usable": USABLE, "rows": rows, "headline": headline(rows),
              "checks": checks, "measurements": measurements}
    machine.write_outputs(Path(out_dir), "memory", result, markdown, plot)
    return result


def _gib(v: float) -> float:
    return round(v / GIB, 2)


def markdown(result: dict) -> str:
    opts = result["options"]
    text = machine.markdown_header("lcmkit bench memory", result["machine"], result["command"])
    text += (f"Memory of one GPU during one step of LCM distillation, GiB (2³⁰ bytes), batch {opts['batch']} per GPU"
             " "
             "at each architecture's resolution. Measured on fake tensors: " + result["activation_method"] + ". "
             "Assumptions (docs/memory.md):\n\n")
    text += "".join(f"- **{k}**: {v}\n" for k, v in result["assumptions"].items()) + "\n"
    text += (f"## What fits\n\nThe preferred setting that fits at batch {opts['batch']} per GPU (fewest GPUs, then no "
             "checkpointing, then AdamW, then encoding per step over cached latents (`--cache-latents`), then bf16; "
             "peak GiB in brackets), and the largest batch of bf16 + 8-bit AdamW + checkpointing + cached latents "
             "on one GPU:\n\n")
    rows = []
    for name, entry in result["headline"].items():
        cells = [f"{e['setting']} ({e['peak_gib']:.1f})" if e else "no" for e in (entry[str(c)] for c in
                                                                                   result["cards_gib"])]
        lean = entry.get("leanest_one_gpu_max_batch", {})
        rows.append([name, *cells, " / ".join(_batch(lean.get(str(c))) for c in result["cards_gib"])])
    text += machine.table(["model/mode", *[f"{c} GB" for c in result["cards_gib"]],
                           "max batch 24/48/80, lean 1 GPU"], rows) + "\n"
    text += "In the table, fits = yes (as is), cached (only with cached latents) or no.\n\n"
    text += "## Table\n\nweights = student + EMA target + teacher + text encoders + VAE on this GPU; activations = " \
            "peak of the student's forward + backward without gradients; peak = resident + the largest phase " \
            "(encode, teacher, target, student, backward, clip, adamw, ema).\n\n"
    table = [[r["arch"], r["mode"], r["precision"], r["optimizer"], "yes" if r["checkpointing"] else "no",
              r["world_size"], _gib(sum(v for k, v in r["resident"].items() if k != "optimizer")),
              _gib(r["resident"]["optimizer"]), _gib(r["grads"]), _gib(r["activations"]), r["peak_phase"],
              _gib(r["peak"]), _gib(r["peak_cached_latents"]),
              *[_fits(r, str(c)) for c in result["cards_gib"]]] for r in result["rows"]]
    text += machine.table(["arch", "mode", "precision", "optimizer", "ckpt", "GPUs", "weights", "optimizer state",
                           "grads", "activations", "peak phase", "peak", "peak, cached latents",
                           *[f"fits {c}" for c in result["cards_gib"]]], table) + "\n"
    if result["checks"]:
        text += "## Check against real peaks on this machine (CPU)\n\nThe same step for real in a fresh process: " \
                "resident set after building the models (over the interpreter's after imports) and its peak over " \
                "the step (VmHWM reset before it), against the estimate on CPU terms (CPU autocast, single-tensor " \
                "AdamW). tracked = the same tensor count on the real tensors. MiB; ratio = measured / estimated.\n\n"
        text += machine.table(["check", "models est", "models RSS", "ratio", "step est", "step tracked",
                               "step RSS", "ratio", "total ratio"],
                              [[c["check"], c["estimate_resident_mib"], c["rss_models_mib"], c["ratio_models"],
                                c["estimate_step_mib"], c["real_tracked_step_mib"], c["rss_step_mib"],
                                c["ratio_step"], c["ratio_total"]] for c in result["checks"]])
    return text


def _fits(row: dict, card: str) -> str:
    return "yes" if row["fits_gib"][card] else "cached" if row["fits_gib_cached_latents"][card] else "no"


def _batch(n) -> str:
    return "–" if n is None else f"{n}+" if n >= MAX_BATCH else str(n)


PLOT_TOP = 100  # GiB shown; taller bars are cut and their total written above them
PLOT_SETTINGS = (("fp32", "adamw", False, 1), ("bf16", "adamw", False, 1), ("bf16", "adamw", True, 1),
                 ("bf16", "adamw8bit", True, 1), ("bf16", "adamw8bit", True, 8))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(r["arch"], r["mode"], r["precision"], r["optimizer"], r["checkpointing"], r["world_size"]): r
            for r in result["rows"]}
    groups = sorted({(r["arch"], r["mode"]) for r in result["rows"]})
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(PLOT_SETTINGS)
    colors = {"weights": "#4c72b0", "optimizer": "#dd8452", "working": "#55a868"}
    for i, setting in enumerate(PLOT_SETTINGS):
        for j, group in enumerate(groups):
            r = rows.get((*group, *setting))
            if r is None:
                continue
            weights = sum(v for k, v in r["resident"].items() if k != "optimizer") / GIB
            state = r["resident"]["optimizer"] / GIB
            working = r["peak"] / GIB - weights - state
            x = j + (i - len(PLOT_SETTINGS) / 2 + 0.5) * width
            bottom = 0.0
            for part, v in (("weights", weights), ("optimizer", state), ("working", working)):
                ax.bar(x, min(v, PLOT_TOP - bottom), width, bottom=bottom, color=colors[part],
                       label=part if (i, j) == (0, 0) else None, edgecolor="white", linewidth=0.3)
                bottom = min(bottom + v, PLOT_TOP)
            total = r["peak"] / GIB
            label = f"{i + 1}" if total <= PLOT_TOP else f"{i + 1}\n{total:.0f}↑"
            ax.text(x, min(total, PLOT_TOP), label, ha="center", va="bottom", fontsize=6)
    for c in result["cards_gib"]:
        ax.axhline(USABLE * c, color="grey", linestyle="--", linewidth=0.7)
        ax.text(len(groups) - 0.5, USABLE * c, f"{USABLE:g} × {c} GB", fontsize=7, va="bottom", ha="right",
                color="grey")
    ax.set_xticks(range(len(groups)), [f"{a}\n{m}" for a, m in groups])
    ax.set_ylim(0, PLOT_TOP * 1.15)
    ax.set_ylabel(f"GiB per GPU (bars over {PLOT_TOP} GiB cut, total written)")
    legend = "; ".join(f"{i + 1}: {describe(dict(precision=p, optimizer=o, checkpointing=c, world_size=w))}"
                       for i, (p, o, c, w) in enumerate(PLOT_SETTINGS))
    ax.set_title(f"distillation memory per GPU, batch {result['options']['batch']}\n{legend}", fontsize=7)
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
