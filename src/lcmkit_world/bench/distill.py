"""``lcmkit bench distill``: seconds per distillation step split by phase, peak memory, UNet forwards per step, and
the LCM-LoRA trainable parameter counts on SD 1.5, SSD-1B and SDXL.

One configuration = (model, mode full|lora, solver). Each runs in a fresh subprocess (``python -m
lcmkit_world.bench.distill SPEC``), so its peak memory is its own: on CPU the kernel's peak RSS (``VmHWM`` in
/proc/self/status) is reset after the models are built (``echo 5 > /proc/self/clear_refs``) and read after the
steps; on CUDA ``torch.cuda.max_memory_allocated`` is reset the same way.

A step is the real recipe's pieces (:func:`lcmkit.train.distill.build_models` / ``make_denoisers`` / ``draw``,
:func:`lcmkit.losses.lcd_loss`, AdamW, gradient clipping, EMA), with each denoiser wrapped in a timer:

- ``teacher``: Ψ, the guided teacher's solver step (DDIM: one batched [uncond; cond] forward; DPM-Solver(++):
  two) — under ``no_grad``;
- ``target``: f_θ⁻ at t_n (one forward, ``no_grad``);
- ``student``: f_θ at t_{n+k} (one forward, with autograd), then ``backward``;
- ``optimizer``: clipping, AdamW, zero_grad, and the EMA of θ⁻ in full mode;
- ``other``: drawing ω, n, ε, the consistency scalings and the loss.

Forward hooks count UNet calls per phase; a count that differs from the recipe's (teacher =
``TEACHER_EVALUATIONS[solver]`` calls of batch 2B, target 1, student 1, none during backward) is an error: it
would mean something is computed twice. Data loading and VAE encoding are excluded (cached latents).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lcmkit.errors import LcmkitError
from lcmkit_world.bench import configs, machine

PHASES = ("teacher", "target", "student", "backward", "optimizer")
#: LCM-LoRA sizes: what the LCM-LoRA report prints, and what our preset gives (docs/reference.md, LCM-LoRA targets).
LORA_PARAMS_REPORT = {"sd15": 67.5e6, "ssd1b": 105e6, "sdxl": 197e6}
LORA_PARAMS_REFERENCE = {"sd15": 67.3e6, "ssd1b": 104.9e6, "sdxl": 196.8e6}
DEFAULTS = {"world": {"batch_size": 16, "steps": 3}, "sd15": {"batch_size": 1, "steps": 2},
            "tiny": {"batch_size": 2, "steps": 2}}
MODEL_NAMES = tuple(DEFAULTS)


@dataclass
class DistillBenchOptions:
    models: list[str] = field(default_factory=lambda: ["world"])
    modes: list[str] = field(default_factory=lambda: ["full", "lora"])
    solvers: list[str] = field(default_factory=lambda: ["ddim", "dpm-solver", "dpm-solver++"])
    steps: int | None = None           # measured steps per configuration; the first also warms up
    batch_size: int | None = None
    device: str = "auto"
    world_teacher: str | None = None
    subprocess: bool = True
    threads: int | None = None
    skip: int = 20
    lora_rank: int = 64


@dataclass(frozen=True)
class RecipeSettings:
    """The fields of a DistillConfig that :func:`lcmkit.train.distill.build_models` reads."""

    mode: str
    teacher: str
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_ema: float = 0.0          # the LCM-LoRA scripts' online target (an EMA target adds one small update)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------

def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB → MiB
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> bool:
    """Start a fresh peak: CUDA allocator stats, or the kernel's VmHWM. False when it cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_mb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"current_mb": torch.cuda.memory_allocated() / 2**20, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"current_mb": _status_mb("VmRSS"), "peak_mb": _status_mb("VmHWM")}


# ---------------------------------------------------------------------------------------------------------------
# Phase timers and UNet forward counts
# ---------------------------------------------------------------------------------------------------------------

class PhaseClock:
    """Seconds per phase, and UNet forwards (calls, batch sizes) attributed to the phase running at the time."""

    def __init__(self, unets, device):
        self.device = device
        self.current = "other"
        self.seconds = {p: 0.0 for p in PHASES}
        self.forwards = {p: [] for p in PHASES + ("other",)}
        self._handles = [u.register_forward_pre_hook(self._count) for u in {id(u): u for u in unets}.values()]

    def _count(self, module, args):
        self.forwards[self.current].append(int(args[0].shape[0]))

    @contextmanager
    def phase(self, name: str):
        previous, self.current = self.current, name
        machine.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            machine.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start
            self.current = previous

    def timed(self, name: str, denoiser):
        def wrapped(x_t, t):
            with self.phase(name):
                return denoiser(x_t, t)
        return wrapped

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def check_forwards(forwards: dict[str, list[int]], solver: str, batch: int) -> dict:
    """Raise unless each phase made exactly the recipe's UNet forwards (nothing computed twice)."""
    from lcmkit.solvers import TEACHER_EVALUATIONS

    expected = {"teacher": [2 * batch] * TEACHER_EVALUATIONS[solver], "target": [batch], "student": [batch],
                "backward": [], "optimizer": [], "other": []}
    if forwards != expected:
        raise LcmkitError(f"UNet forwards per step {forwards} differ from the recipe's {expected} "
                          f"(solver {solver}, batch {batch}): something is computed twice or skipped")
    return {k: len(v) for k, v in forwards.items() if v}


# ---------------------------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------------------------

def teacher_pipeline(model: str, world_teacher: str | None):
    from lcmkit.pipelines import load_pipeline
    from lcmkit_world.bench.subjects import WORLD_TEACHER

    if model == "world":
        folder = Path(world_teacher) if world_teacher else WORLD_TEACHER
        if not (folder / "model_index.json").is_file():
            raise LcmkitError(f"world teacher not found at {folder}; pass --world-teacher DIR (or --models sd15)")
        return load_pipeline(folder, device="cpu"), str(folder)
    return configs.build_pipeline(configs.ARCHITECTURES[model]), f"random {model}"


def conditioning(pipe, batch: int, device):
    """cond / uncond text conditioning for a batch (SD: "" is the unconditional prompt), encoded once."""
    from lcmkit.denoisers import TextConditioning
    from lcmkit.train.encode import encode_text

    hidden, _ = encode_text(pipe, "sd", ["a red circle"] * batch)
    empty, _ = encode_text(pipe, "sd", [""])
    return TextConditioning(hidden.to(device)), TextConditioning(empty.expand_as(hidden).to(device))


def one_step(models, optimizer, clock: PhaseClock, z0, cond, uncond, solver: str, skip: int, step: int) -> float:
    """One optimizer step of LCD, phases timed; returns the loss."""
    from lcmkit.losses import lcd_loss
    from lcmkit.train.distill import draw, make_denoisers
    from lcmkit.train.optim import ema_update_
    from lcmkit.train.rng import generator_for

    num_points = len(models.alphas_cumprod) // skip
    omega, index, noise = draw(z0.shape[0], tuple(z0.shape), (5.0, 15.0), num_points, generator_for(0, step))
    student, target, teacher = make_denoisers(models, cond, uncond, omega.to(z0.device))
    loss, _ = lcd_loss(clock.timed("student", student), clock.timed("target", target), clock.timed("teacher", teacher),
                       z0, noise.to(z0.device), index.to(z0.device), models.alphas_cumprod, skip=skip, solver=solver)
    with clock.phase("backward"):
        loss.backward()
    with clock.phase("optimizer"):
        torch.nn.utils.clip_grad_norm_(models.trainable(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if models.mode == "full":
            ema_update_(models.target.parameters(), models.student.parameters(), 0.95)
    return float(loss.detach())


def measure_configuration(spec: dict) -> dict:
    """Build the models of one (model, mode, solver) and time ``spec["steps"]`` optimizer steps."""
    from lcmkit.pipelines import resolve_device, vae_scale_factor
    from lcmkit.train.config import OptimConfig
    from lcmkit.train.distill import build_models
    from lcmkit.train.optim import make_optimizer
    from lcmkit.train.rng import generator_for

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    pipe, source = teacher_pipeline(spec["model"], spec.get("world_teacher"))
    memory_before = memory_mb(device)
    settings = RecipeSettings(spec["mode"], source, spec["lora_rank"], float(spec["lora_rank"]))
    models = build_models(settings, pipe, device, generator_for(0, 1))
    optimizer = make_optimizer(models.trainable(), OptimConfig(lr=1e-5, warmup_steps=0))
    latent = pipe.unet.config.sample_size
    batch = spec["batch_size"]
    z0 = torch.randn(batch, pipe.unet.config.in_channels, latent, latent,
                     generator=torch.Generator().manual_seed(0)).to(device)
    cond, uncond = conditioning(pipe, batch, device)
    memory_models = memory_mb(device)
    peak_reset = reset_peak(device)
    steps = []
    for step in range(spec["steps"]):
        clock = PhaseClock({models.teacher, models.student, models.target}, device)
        machine.synchronize(device)
        start = time.perf_counter()
        loss = one_step(models, optimizer, clock, z0, cond, uncond, spec["solver"], spec["skip"], step)
        total = time.perf_counter() - start
        clock.close()
        counts = check_forwards(clock.forwards, spec["solver"], batch)
        phases = dict(clock.seconds, other=total - sum(clock.seconds.values()))
        steps.append({"seconds": total, "phases": phases, "loss": loss, "unet_forwards": counts})
    memory_after = memory_mb(device)
    measured = steps[1:] or steps  # the first step also allocates AdamW's state
    return {"model": spec["model"], "mode": spec["mode"], "solver": spec["solver"], "batch_size": batch,
            "latent_size": latent, "resolution": latent * vae_scale_factor(pipe), "skip": spec["skip"],
            "teacher": source, "trainable_params": sum(p.numel() for p in models.trainable()),
            "seconds_per_step": machine.median([s["seconds"] for s in measured]),
            "phases": {p: machine.median([s["phases"][p] for s in measured]) for p in PHASES + ("other",)},
            "unet_forwards_per_step": steps[-1]["unet_forwards"], "steps": steps,
            "memory": {"device": device.type, "before_models_mb": memory_before["current_mb"],
                       "models_mb": memory_models["current_mb"], "peak_during_steps_mb": memory_after["peak_mb"],
                       "peak_reset": peak_reset,
                       "step_peak_over_models_mb": _minus(memory_after["peak_mb"], memory_models["current_mb"])}}


def _minus(a, b):
    return None if a is None or b is None else a - b


def run_configuration(spec: dict, isolated: bool) -> dict:
    """In a fresh interpreter (``isolated``: its own peak memory) or in this one."""
    if not isolated:
        return dict(measure_configuration(spec), memory_isolated=False)
    proc = subprocess.run([sys.executable, "-m", "lcmkit_world.bench.distill", json.dumps(spec)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # the child's own user-facing error, without its traceback; else the last lines of what it printed
        errors = [line.split(": ", 1)[1] for line in lines if line.startswith("lcmkit.errors.LcmkitError: ")]
        raise LcmkitError(f"distill bench configuration {spec['model']}/{spec['mode']}/{spec['solver']} failed: "
                          + (errors[-1] if errors else " | ".join(lines[-3:])))
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), memory_isolated=True)


# ---------------------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------------------

def lora_parameter_counts(rank: int = 64) -> dict:
    out = {}
    for name in LORA_PARAMS_REPORT:  # SD 1.5, SSD-1B, SDXL
        counted = configs.lora_trainable_parameters(configs.ARCHITECTURES[name], rank, float(rank))
        counted["report"] = LORA_PARAMS_REPORT[name]
        counted["reference"] = LORA_PARAMS_REFERENCE[name]
        counted["matches_reference"] = abs(counted["trainable_params"] - LORA_PARAMS_REFERENCE[name]) <= 0.1e6
        out[name] = counted
    return out


def specs(options: DistillBenchOptions) -> list[dict]:
    from lcmkit.solvers import SOLVERS

    for model in options.models:
        if model not in MODEL_NAMES:
            raise LcmkitError(f"unknown model {model!r} for bench distill; use {', '.join(MODEL_NAMES)}")
    for mode in options.modes:
        if mode not in ("full", "lora"):
            raise LcmkitError(f"unknown mode {mode!r}; use full, lora")
    for solver in options.solvers:
        if solver not in SOLVERS:
            raise LcmkitError(f"unknown solver {solver!r}; use {', '.join(SOLVERS)}")
    return [{"model": m, "mode": mode, "solver": s, "skip": options.skip, "lora_rank": options.lora_rank,
             "steps": options.steps or DEFAULTS[m]["steps"], "batch_size": options.batch_size or DEFAULTS[m]["batch_size"],
             "device": options.device, "world_teacher": options.world_teacher, "threads": options.threads}
            for m in options.models for mode in options.modes for s in options.solvers]


def bench_distill(options: DistillBenchOptions, out_dir: str | Path, command: str, log=print) -> dict:
    from lcmkit.pipelines import resolve_device

    result = {"bench": "distill", "command": command, "machine": machine.machine_info(resolve_device(options.device)),
              "options": asdict(options), "configurations": []}
    for spec in specs(options):
        log(f"[distill] {spec['model']} {spec['mode']} {spec['solver']} (batch {spec['batch_size']}, "
            f"{spec['steps']} steps) …")
        result["configurations"].append(run_configuration(spec, options.subprocess))
    result["lora_trainable_params"] = lora_parameter_counts(options.lora_rank)
    machine.write_outputs(Path(out_dir), "distill", result, markdown, plot)
    return result


def markdown(result: dict) -> str:
    text = machine.markdown_header("lcmkit bench distill", result["machine"], result["command"])
    rows = [[c["model"], c["mode"], c["solver"], c["batch_size"], c["seconds_per_step"],
             *[c["phases"][p] for p in PHASES + ("other",)], c["unet_forwards_per_step"].get("teacher"),
             c["memory"]["peak_during_steps_mb"], c["memory"]["step_peak_over_models_mb"], c["trainable_params"] / 1e6]
            for c in result["configurations"]]
    text += "Seconds per optimizer step (median after the first step), by phase; UNet forwards per step checked: " \
            "teacher = 1 (DDIM) or 2 (DPM-Solver, DPM-Solver++) batched CFG forwards, target 1, student 1.\n\n"
    text += machine.table(["model", "mode", "solver", "batch", "s/step", *[f"{p} s" for p in PHASES], "other s",
                           "teacher forwards", "peak MiB", "peak over models MiB", "trainable M"], rows) + "\n"
    lora = [[k, v["rank"], v["lora_layers"], v["trainable_params"] / 1e6, v["reference"] / 1e6, v["report"] / 1e6,
             v["unet_params"] / 1e6] for k, v in result["lora_trainable_params"].items()]
    text += "LCM-LoRA trainable parameters (preset `lcmkit.lora.LCM_LORA_TARGETS`, counted on a meta-device UNet):\n\n"
    text += machine.table(["UNet", "rank", "LoRA layers", "measured M", "preset M (docs)", "LCM-LoRA report M",
                           "UNet M"], lora)
    return text


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs_ = result["configurations"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(configs_)), 4))
    bottom = [0.0] * len(configs_)
    for p in PHASES + ("other",):
        values = [c["phases"][p] for c in configs_]
        ax.bar(range(len(configs_)), values, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(configs_)), [f"{c['model']}\n{c['mode']}\n{c['solver']}" for c in configs_], fontsize=7)
    ax.set_ylabel("seconds per step")
    ax.set_title("distillation step cost by phase")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # one configuration in a fresh process: JSON on the last line of stdout
    print(json.dumps(measure_configuration(json.loads(sys.argv[1]))))
