"""``lcmkit bench speed``: end-to-end seconds per image and UNet evaluations, LCM / LCM-LoRA vs the teacher, and
lcmkit's library path vs diffusers' own pipelines on the same model.

End to end = text encoding + every sampling step + VAE decode, for one image (float arrays out, no PNG encode).
Methods per model (``lcmkit.pipelines.generate`` unless named ``diffusers-…``):

- ``teacher``: DPM-Solver++ (2M) 25 steps with CFG at guidance 7.5 → 25 batched [uncond; cond] calls = 50 UNet
  evaluations; the ceiling of any LCM speed-up is 50 / N;
- ``lcm-N``: the full LCM (w-embedding, one forward per step) at guidance 7.5 → N evaluations;
- ``lcm-lora-N``: the teacher with the LCM-LoRA fused into its weights, at guidance 1 (baked in) → N evaluations.
  The LoRA is held fused around the call (``with applied_loras(pipe, [lora]): generate(pipe, …)``, as ``eval`` and
  a caller generating many images hold it for a run); fusing and restoring happen outside the timed call and are
  timed on their own (``fuse_seconds``, ``restore_seconds``);
- ``lcm-lora-call-N`` (N = ``compare_steps``): ``generate(pipe, …, loras=[lora])``, the LoRA read (from the
  process's LoRA cache after the first call), fused and restored inside every timed call;
- ``lcm-lora-merged-N`` (N = ``compare_steps``): the LCM-LoRA merged for good into a copy of the teacher's UNet (as
  ``lcmkit lora combine`` saves it): the same weights as ``lcm-lora-N`` with no LoRA machinery at all. It holds a
  second copy of the UNet;
- ``diffusers-lcm-N``: ``LatentConsistencyModelPipeline`` on the same full LCM;
- ``diffusers-lcm-lora-N``: ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``) with ``LCMScheduler``
  and the same LoRA file through ``load_lora_weights``.

Forward hooks (:mod:`.hooks`) count UNet calls and evaluations and split each run's time into text encoder, UNet,
VAE decoder and the rest. "The rest" divided by the UNet's time is the per-step overhead fraction (sampler
arithmetic, scheduler bookkeeping).

``lora_vs_merged`` divides the LCM-LoRA rows (``lcm-lora-N``, ``lcm-lora-call-N``) by the merged models at
``compare_steps``: the full LCM ``lcm-N`` (other weights: on random weights the two UNets' speeds may differ for
reasons of their own) and ``lcm-lora-merged-N`` (the same weights), per round, as the lcmkit/diffusers pairs. ``--resolution sd15=128`` samples a
model at another size than its own (SD 1.5's architecture at 128² fits minutes on a CPU) and ``--no-teacher sd15``
leaves that model's teacher rows out (no speed-ups over the teacher then).

Timing: all methods of a model run interleaved, ``repeats`` rounds with the order rotated each round; medians are
reported, and each lcmkit/diffusers ratio is the median of the per-round paired ratios. The LoRA pair runs in a
second interleaved phase: diffusers' ``load_lora_weights`` wraps the UNet's layers (PEFT), so while it is loaded
lcmkit's runs pass through the (disabled) wrappers too — a small handicap for lcmkit, none for diffusers.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lcmkit.errors import LcmkitError
from lcmkit_world.bench import machine
from lcmkit_world.bench.hooks import pipeline_meters
from lcmkit_world.bench.subjects import MODEL_NAMES, Subject, describe, load_subject

TEACHER = ("dpm-solver++", 25, 7.5)
RESULT_NAMES = ("speed.json", "speed.md", "speed.png")
PROMPT = "a red circle on blue"


@dataclass
class SpeedOptions:
    models: list[str] = field(default_factory=lambda: ["world"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    compare_steps: int = 4             # step count of the lcmkit vs diffusers pairs
    teacher_steps: int = TEACHER[1]
    guidance: float = TEACHER[2]       # teacher CFG and full-LCM w-embedding (diffusers' guidance_scale)
    lora_guidance: float = 1.0         # LCM-LoRA: guidance baked in, no CFG
    repeats: int | None = None         # interleaved rounds; None: 5 on the world / tiny models, 1 on sd15 / sdxl

    def rounds(self, model: str) -> int:
        """Measured rounds for ``model``: ``repeats`` if given, else 1 for full-size models (minutes per image on a
        CPU) and 5 for the small ones (tens of milliseconds per image: one round would be noise)."""
        return self.repeats or (1 if model in ("sd15", "sdxl") else 5)
    warmup: bool | None = None         # default: warm up unless one UNet forward takes over a second
    device: str = "auto"
    dtype: str | None = None           # default float16 on CUDA, float32 on CPU
    compile: bool = False
    seed: int = 0
    prompt: str = PROMPT
    world_teacher: str | None = None
    world_lcm: str | None = None
    world_lora: str | None = None
    estimate_only: bool = False
    # model → pixels; a model not named samples at its own size (world 32², sd15 512², sdxl 1024²)
    resolution: dict[str, int] = field(default_factory=dict)
    no_teacher: list[str] = field(default_factory=list)  # models measured without the teacher rows


# ---------------------------------------------------------------------------------------------------------------
# One measured run
# ---------------------------------------------------------------------------------------------------------------

def measure(pipe, call, device) -> dict:
    """Run ``call()`` once with meters on ``pipe``: seconds in total and per part, UNet calls and evaluations, and
    the CPU seconds this process spent (``cpu_seconds``: on a CPU shared with other jobs, time spent waiting for a
    core counts in ``seconds`` but not here)."""
    sync = torch.device(device).type == "cuda"
    with pipeline_meters(pipe, sync=sync) as m:
        cpu = time.process_time()
        images, total = machine.timed(call, device)
        cpu = time.process_time() - cpu
    parts = {"unet": m["unet"].seconds, "text": m["text"].seconds, "vae": m["vae"].seconds}
    other = total - sum(parts.values())
    return {"seconds": total, "cpu_seconds": cpu, "unet_seconds": parts["unet"], "text_seconds": parts["text"],
            "vae_seconds": parts["vae"], "other_seconds": other, "unet_calls": m["unet"].calls,
            "unet_evaluations": m["unet"].samples, "image": np.asarray(images)[0]}


def lcmkit_run(pipe, options: SpeedOptions, resolution: int, sampler: str, steps: int, guidance: float, loras=()):
    from lcmkit.pipelines import generate

    def call():
        return generate(pipe, options.prompt, steps=steps, guidance=guidance, seed=options.seed, sampler=sampler,
                        height=resolution, width=resolution, loras=loras, progress=False, output_type="np")
    return call


def diffusers_run(pipe, options: SpeedOptions, resolution: int, steps: int, guidance: float, device):
    def call():
        g = torch.Generator(device).manual_seed(options.seed)
        return pipe(options.prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                    height=resolution, width=resolution, output_type="np").images
    return call


def diffusers_lora_pipeline(teacher):
    """The teacher's components (shared, not copied) in a pipeline of the same class with ``LCMScheduler``."""
    from diffusers import LCMScheduler

    pipe = type(teacher)(**teacher.components)
    pipe.scheduler = LCMScheduler.from_config(teacher.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Plan, estimate, run
# ---------------------------------------------------------------------------------------------------------------

def plan(subject: Subject, options: SpeedOptions, device) -> dict[str, tuple]:
    """method name → (pipe whose parts are metered, call, expected UNet evaluations, LoRAs held fused around the
    call) for the first phase."""
    r, teacher, lora = subject.resolution, subject.teacher, [str(subject.lora)]
    sampler, steps, g = TEACHER[0], options.teacher_steps, options.guidance
    cfg_factor = 2 if g > 1 else 1  # CFG: one batched [uncond; cond] call = 2 evaluations
    runs = {}
    if subject.name not in options.no_teacher:
        runs["teacher"] = (teacher, lcmkit_run(teacher, options, r, sampler, steps, g), cfg_factor * steps, ())
    for n in options.steps:
        if subject.lcm is not None:
            runs[f"lcm-{n}"] = (subject.lcm, lcmkit_run(subject.lcm, options, r, "lcm", n, g), n, ())
        runs[f"lcm-lora-{n}"] = (teacher, lcmkit_run(teacher, options, r, "lcm", n, options.lora_guidance), n, lora)
    n = options.compare_steps
    runs[f"lcm-lora-call-{n}"] = (teacher, lcmkit_run(teacher, options, r, "lcm", n, options.lora_guidance, lora),
                                  n, ())
    if subject.merged is not None:
        runs[f"lcm-lora-merged-{n}"] = (subject.merged, lcmkit_run(subject.merged, options, r, "lcm", n,
                                                                   options.lora_guidance), n, ())
    if subject.lcm is not None:
        runs[f"diffusers-lcm-{n}"] = (subject.lcm, diffusers_run(subject.lcm, options, r, n, g, device), n, ())
    return runs


def merged_lora_pipeline(teacher, lora: Path):
    """The teacher's components in a pipeline of its class, the LCM-LoRA merged into copies of the models it
    touches (:func:`lcmkit.task_arithmetic.merge_into_pipeline`); the teacher itself is left as it was."""
    from lcmkit.lora_formats import pipeline_models
    from lcmkit.task_arithmetic import load_lora_specs, merge_into_pipeline

    pipe = type(teacher)(**teacher.components)
    pipe.set_progress_bar_config(disable=True)
    return merge_into_pipeline(pipe, load_lora_specs(pipeline_models(pipe), [str(lora)]))


def unet_forward_seconds(subject: Subject, device) -> float:
    """One batch-1 UNet forward at the subject's resolution (also warms the UNet up)."""
    from lcmkit.denoisers import TextConditioning, unet_output
    from lcmkit.pipelines import encode_prompt

    pipe = subject.teacher
    unet = pipe.unet
    with torch.inference_mode():
        cond = encode_prompt(pipe, [""], subject.resolution, subject.resolution)
        size = subject.resolution // _factor(pipe)
        x = torch.randn(1, unet.config.in_channels, size, size, device=device, dtype=unet.dtype)
        t = torch.tensor([999], device=device)
        _, seconds = machine.timed(lambda: unet_output(unet, x, t, TextConditioning(*_fields(cond))), device)
    return seconds


def _factor(pipe) -> int:
    from lcmkit.pipelines import vae_scale_factor
    return vae_scale_factor(pipe)


def _fields(cond):
    return cond.encoder_hidden_states, cond.text_embeds, cond.time_ids


def estimate(evaluations: dict[str, int], forward_s: float, rounds: int) -> float:
    """Seconds the UNet alone will take: evaluations × one forward × rounds (CFG pairs counted as 2)."""
    return sum(evaluations.values()) * forward_s * rounds


def held_measure(pipe, call, device, loras) -> dict:
    """:func:`measure` with ``loras`` held fused around the call (not timed with it); the fuse and the restore
    are timed on their own."""
    from lcmkit.pipelines import applied_loras

    held, fuse_s = machine.timed(lambda: applied_loras(pipe, loras), device)
    try:
        sample = measure(pipe, call, device)
    finally:
        _, restore_s = machine.timed(held.remove, device)
    return dict(sample, fuse_seconds=fuse_s, restore_seconds=restore_s)


def run_phase(runs: dict[str, tuple], rounds: int, device, warmup: bool) -> dict[str, list[dict]]:
    calls = {name: (lambda p=pipe, c=call, h=held: held_measure(p, c, device, h) if h else measure(p, c, device))
             for name, (pipe, call, _, held) in runs.items()}
    return machine.interleaved(calls, rounds, warmup=warmup)


def lora_phase(subject: Subject, options: SpeedOptions, device, warmup: bool) -> dict[str, list[dict]]:
    """lcmkit ``loras=`` vs diffusers ``load_lora_weights`` on the same UNet, interleaved.

    Both attach the LoRA once, outside the timed call, as a library user generating many images would:
    diffusers with ``load_lora_weights`` (unloaded after each of its runs, so its PEFT wrappers never sit in the
    shared UNet during lcmkit's runs), lcmkit with ``applied_loras`` (per-key conversion, merged into the UNet's
    weights for its runs and restored bit for bit after each).
    """
    n, r = options.compare_steps, subject.resolution
    pipe = diffusers_lora_pipeline(subject.teacher)
    d_call = diffusers_run(pipe, options, r, n, options.lora_guidance, device)

    def diffusers_measure():
        pipe.load_lora_weights(str(subject.lora.parent), weight_name=subject.lora.name, adapter_name="lcm")
        try:
            return measure(pipe, d_call, device)
        finally:
            pipe.unload_lora_weights()

    k_call = lcmkit_run(subject.teacher, options, r, "lcm", n, options.lora_guidance)

    def lcmkit_measure():
        from lcmkit.pipelines import applied_loras

        with applied_loras(subject.teacher, [str(subject.lora)]):
            return measure(subject.teacher, k_call, device)

    calls = {"lcmkit": lcmkit_measure, "diffusers": diffusers_measure}
    return machine.interleaved(calls, options.rounds(subject.name), warmup=warmup)


# ---------------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------------

def summarise(samples: list[dict]) -> dict:
    """Medians over the repeats; UNet counts are the same every repeat (checked)."""
    calls = {s["unet_calls"] for s in samples}
    evals = {s["unet_evaluations"] for s in samples}
    if len(calls) != 1 or len(evals) != 1:
        raise LcmkitError(f"UNet call counts differ between repeats: {sorted(calls)} / {sorted(evals)}")
    out = {"seconds_per_image": machine.median([s["seconds"] for s in samples]),
           "seconds": [s["seconds"] for s in samples], "noise": machine.spread([s["seconds"] for s in samples]),
           "unet_calls": calls.pop(), "unet_evaluations": evals.pop()}
    for part in ("cpu", "unet", "text", "vae", "other", "fuse", "restore"):
        if f"{part}_seconds" in samples[0]:
            out[f"{part}_seconds"] = machine.median([s[f"{part}_seconds"] for s in samples])
    out["overhead_fraction_of_unet"] = machine.median([s["other_seconds"] / s["unet_seconds"] for s in samples])
    return out


def paired_ratio(a: list[dict], b: list[dict]) -> dict:
    """Median over rounds of a's seconds / b's seconds (rounds pair runs made close together in time); the same
    for CPU seconds (``cpu_ratio``, ``cpu_noise``)."""
    ratios = [x["seconds"] / y["seconds"] for x, y in zip(a, b)]
    ratio = machine.median(ratios)
    noise = machine.spread(ratios)
    cpu = [x["cpu_seconds"] / y["cpu_seconds"] for x, y in zip(a, b)]
    diff = float(np.abs(a[-1]["image"].astype(np.float64) - b[-1]["image"].astype(np.float64)).max())
    # one round has no spread to judge "within noise" by: None (the Markdown says so), not a verdict on 0.1 %
    within = ratio <= 1.0 + noise if len(ratios) > 1 else None
    return {"ratio": ratio, "per_round": ratios, "noise": noise, "at_most_1_within_noise": within,
            "same_image_max_abs_diff": diff, "cpu_ratio": machine.median(cpu), "cpu_per_round": cpu,
            "cpu_noise": machine.spread(cpu)}


def overhead_fit(methods: dict, family: str) -> dict:
    """Split lcmkit's time outside the UNet into per call + per step: least squares of ``other_seconds`` against N
    over ``<family>-N``; the per-step part as a fraction of one step's UNet time is the overhead that scales."""
    points = sorted((int(k[len(family) + 1:]), m) for k, m in methods.items()
                    if k.startswith(family + "-") and k[len(family) + 1:].isdigit())
    n = np.array([p[0] for p in points], dtype=np.float64)
    other = np.array([p[1]["other_seconds"] for p in points])
    unet_per_step = machine.median([p[1]["unet_seconds"] / p[0] for p in points])
    per_step, per_call = np.polyfit(n, other, 1)
    return {"per_call_seconds": float(per_call), "per_step_seconds": float(per_step),
            "unet_seconds_per_step": unet_per_step, "per_step_fraction_of_unet": float(per_step) / unet_per_step}


def model_result(subject: Subject, options: SpeedOptions, main: dict, lora: dict, forward_s: float,
                 expected: dict[str, int]) -> dict:
    methods = {name: summarise(samples) for name, samples in main.items()}
    for name, m in methods.items():
        m["expected_unet_evaluations"] = expected[name]
    t = methods["teacher"]["seconds_per_image"] if "teacher" in methods else None
    speedup = {} if t is None else {
        name: {"speedup": t / m["seconds_per_image"],
               "ceiling": methods["teacher"]["unet_evaluations"] / m["unet_evaluations"]}
        for name, m in methods.items() if name != "teacher"}
    n = options.compare_steps
    lora_vs_merged = {}  # LCM-LoRA ÷ a merged model at the same steps (the bar: ≤ 1.02)
    for over, suffix in ((f"lcm-{n}", ""), (f"lcm-lora-merged-{n}", "_vs_merged_lora")):
        for kind, name in (("held", f"lcm-lora-{n}"), ("per_call", f"lcm-lora-call-{n}")):
            if over in main:
                ratio = paired_ratio(main[name], main[over])
                if not over.startswith("lcm-lora"):
                    ratio.pop("same_image_max_abs_diff")  # the full LCM is another model: its image differs
                lora_vs_merged[kind + suffix] = dict(ratio, method=name, over=over)
    pairs = {"lcm-lora": dict(paired_ratio(lora["lcmkit"], lora["diffusers"]),
                              lcmkit=summarise(lora["lcmkit"]), diffusers=summarise(lora["diffusers"]))}
    if f"diffusers-lcm-{n}" in main and f"lcm-{n}" in main:
        pairs["lcm"] = paired_ratio(main[f"lcm-{n}"], main[f"diffusers-lcm-{n}"])
    lcm4 = methods.get("lcm-4") or methods.get("lcm-lora-4")
    overhead = {family: overhead_fit(methods, family) for family in ("lcm", "lcm-lora")
                if sum(k.startswith(family + "-") and k[len(family) + 1:].isdigit() for k in methods) >= 2}
    return dict(describe(subject), unet_forward_seconds=forward_s, methods=methods, speedup=speedup,
                lcmkit_vs_diffusers=pairs, overhead=overhead, lora_vs_merged=lora_vs_merged,
                speedup_lcm4_vs_teacher_dpmpp25_cfg=None if None in (lcm4, t) else t / lcm4["seconds_per_image"],
                lcmkit_over_diffusers_time_ratio=max(p["ratio"] for p in pairs.values()))


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def prepare(subject: Subject, options: SpeedOptions, device, dtype) -> None:
    pipes = [subject.teacher] + ([subject.lcm] if subject.lcm is not None else [])
    for pipe in pipes:
        pipe.to(device)
        if pipe.unet.dtype != dtype:
            pipe.to(dtype)
        pipe.set_progress_bar_config(disable=True)
        if options.compile:  # forward only: the meters' hooks stay outside the compiled graph
            pipe.unet.forward = torch.compile(pipe.unet.forward)


def resolve(options: SpeedOptions):
    from lcmkit.pipelines import resolve_device, resolve_dtype

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    return device, dtype


def bench_speed(options: SpeedOptions, out_dir: str | Path, command: str, log=print) -> dict:
    """Measure every model in ``options.models``; write speed.json/.md/.png into ``out_dir``; return the result."""
    device, dtype = resolve(options)
    if options.compare_steps not in options.steps:
        options.steps = sorted(set(options.steps) | {options.compare_steps})
    result = {"bench": "speed", "command": command, "machine": machine.machine_info(device),
              "options": asdict(options), "dtype": str(dtype), "models": {}}
    with tempfile.TemporaryDirectory(prefix="lcmkit-bench-") as work:
        for name in options.models:
            log(f"[speed] building {name} …")
            subject = load_subject(name, Path(work), options)
            subject.resolution = options.resolution.get(name, subject.resolution)
            prepare(subject, options, device, dtype)
            if not options.estimate_only:
                subject.merged = merged_lora_pipeline(subject.teacher, subject.lora)
            forward_s = unet_forward_seconds(subject, device)
            runs = plan(subject, options, device)
            expected = {k: v for k, (_, _, v, _) in runs.items()}
            warmup = options.warmup if options.warmup is not None else forward_s < 1.0
            rounds = options.rounds(name) + int(warmup)
            total = estimate(expected, forward_s, rounds) + 2 * options.compare_steps * forward_s * rounds
            log(f"[speed] {name}: one UNet forward {forward_s:.3g} s → about {total:.0f} s of UNet time "
                f"for {rounds} round(s) of {len(runs) + 2} runs")
            if options.estimate_only:
                result["models"][name] = dict(describe(subject), unet_forward_seconds=forward_s,
                                              estimated_seconds=total)
                continue
            main = run_phase(runs, options.rounds(name), device, warmup)
            lora = lora_phase(subject, options, device, warmup)
            result["models"][name] = model_result(subject, options, main, lora, forward_s, expected)
            del subject
    result["machine"]["load_average_end"] = machine.load_average()
    for entry in result["models"].values():
        entry["command"], entry["date"] = command, result["machine"]["date"]
    keep_other_models(result, Path(out_dir))
    add_headline(result)
    machine.write_outputs(Path(out_dir), "speed", result, markdown, plot)
    return result


def keep_other_models(result: dict, out_dir: Path) -> None:
    """Models an earlier run measured into ``out_dir`` and this one did not stay (each model records its own
    command and date): a re-run of the world keeps the slower full-size models behind it, an SDXL run the world.
    Models are then listed world, sd15, sdxl (others after), so the reference model of the headline does not
    depend on which model was measured last."""
    path = out_dir / "speed.json"
    if not result["options"]["estimate_only"] and path.is_file():
        earlier = json.loads(path.read_text())
        for name, entry in earlier.get("models", {}).items():
            if name not in result["models"] and "methods" in entry:
                entry.setdefault("command", earlier.get("command"))
                entry.setdefault("date", earlier.get("machine", {}).get("date"))
                result["models"][name] = entry
    rank = {name: i for i, name in enumerate(MODEL_NAMES)}
    names = sorted(result["models"], key=lambda n: rank.get(n, len(rank)))  # stable: unknown names keep their order
    result["models"] = {n: result["models"][n] for n in names}


def add_headline(result: dict) -> None:
    """Top-level keys from the first measured model (the reference); the ratio is the worst pair overall."""
    measured = {k: v for k, v in result["models"].items() if "methods" in v}
    result["reference_model"] = next(iter(measured), None)
    ref = measured.get(result["reference_model"], {})
    result["speedup_lcm4_vs_teacher_dpmpp25_cfg"] = ref.get("speedup_lcm4_vs_teacher_dpmpp25_cfg")
    result["lcmkit_over_diffusers_time_ratio"] = max((m["lcmkit_over_diffusers_time_ratio"]
                                                      for m in measured.values()), default=None)
    fits = ref.get("overhead", {})
    fit = fits.get("lcm") or fits.get("lcm-lora")
    result["lcmkit_per_step_overhead_fraction_of_unet"] = None if fit is None else fit["per_step_fraction_of_unet"]


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    text = machine.markdown_header("lcmkit bench speed", result["machine"], result["command"])
    text += (f"Reference model `{result.get('reference_model')}`: speed-up of LCM 4 steps over the teacher "
             f"(DPM-Solver++ 25 steps, CFG 7.5): **{_fmt(result.get('speedup_lcm4_vs_teacher_dpmpp25_cfg'))}**; "
             f"lcmkit / diffusers time (worst pair): **{_fmt(result.get('lcmkit_over_diffusers_time_ratio'))}**; "
             f"lcmkit's per-step overhead outside the UNet: "
             f"**{_pct(result.get('lcmkit_per_step_overhead_fraction_of_unet'))}** of one step's UNet time "
             f"(target < 2%).\n\n")
    for name, m in result["models"].items():
        text += f"## {name} ({m['resolution']}², UNet {m['unet_params'] / 1e6:.1f}M parameters)\n\n"
        if m.get("command") not in (None, result["command"]):
            text += f"Measured by `{m['command']}` ({m.get('date')}).\n\n"
        text += f"Weights: {m['weights']}. One UNet forward: {m['unet_forward_seconds']:.3g} s.\n\n"
        if "methods" not in m:
            text += f"Estimate only: about {m['estimated_seconds']:.0f} s of UNet time.\n\n"
            continue
        rows = []
        for k, v in m["methods"].items():
            default = {"speedup": 1.0, "ceiling": 1.0} if k == "teacher" else {"speedup": None, "ceiling": None}
            s = m["speedup"].get(k, default)
            rows.append([k, v["seconds_per_image"], v["noise"], v["unet_evaluations"], s["speedup"], s["ceiling"],
                         v["unet_seconds"], v["text_seconds"], v["vae_seconds"], _pct(v["overhead_fraction_of_unet"])])
        text += machine.table(["method", "s/image", "± (half range)", "UNet evals", "speed-up", "ceiling",
                               "UNet s", "text s", "VAE s", "overhead / UNet"], rows) + "\n"

        def verdict(p):
            return "n/a (1 round)" if p["at_most_1_within_noise"] is None else p["at_most_1_within_noise"]
        pair_rows = [[k, p["ratio"], p["noise"], verdict(p), p["same_image_max_abs_diff"]]
                     for k, p in m["lcmkit_vs_diffusers"].items()]
        text += machine.table(["lcmkit / diffusers", "time ratio", "± (half range)", "≤ 1 within noise",
                               "max |Δ image|"], pair_rows) + "\n"
        fit_rows = [[k, f["per_call_seconds"], f["per_step_seconds"], f["unet_seconds_per_step"],
                     _pct(f["per_step_fraction_of_unet"])] for k, f in m["overhead"].items()]
        text += machine.table(["lcmkit time outside the UNet", "per call s", "per step s", "UNet s per step",
                               "per step / UNet"], fit_rows) + "\n"
        text += lora_vs_merged_table(m)
    return text


def lora_vs_merged_table(m: dict) -> str:
    """LCM-LoRA ÷ the full LCM and ÷ the LoRA merged into a copy, at the same steps, held fused for the run and
    fused per call, with the fuse's cost."""
    pairs = m.get("lora_vs_merged") or {}
    if not pairs:
        return ""
    how = {"held": "fused for the run (`with applied_loras(…)` around the calls)",
           "per_call": "`generate(…, loras=[file])` each call (cached read, fuse, restore)"}
    rows = []
    for kind, p in pairs.items():
        method = m["methods"][p["method"]]
        rows.append([f"{p['method']} ÷ {p['over']}", how[kind.split("_vs_")[0]], p["ratio"], p["noise"],
                     p["cpu_ratio"], p["cpu_noise"], p.get("same_image_max_abs_diff"), method.get("fuse_seconds"),
                     method.get("restore_seconds")])
    return machine.table(["LCM-LoRA ÷ merged", "LoRA applied", "time ratio (bar ≤ 1.02)", "± (half range)",
                          "CPU-time ratio", "± (half range)", "max |Δ image|", "fuse s (outside the call)",
                          "restore s"], rows) + "\n"


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {k: v for k, v in result["models"].items() if "methods" in v}
    fig, axes = plt.subplots(1, max(len(measured), 1), figsize=(6 * max(len(measured), 1), 4), squeeze=False)
    for ax, (name, m) in zip(axes[0], measured.items()):
        names = list(m["methods"])
        secs = [m["methods"][k]["seconds_per_image"] for k in names]
        bars = ax.bar(range(len(names)), secs, color=["tab:gray" if k == "teacher" else "tab:blue" for k in names])
        ref = f"lcm-{result['options']['compare_steps']}"
        for bar, k, sec in zip(bars, names, secs):
            if "teacher" in m["methods"]:
                label = f"×{m['speedup'][k]['speedup']:.1f}" if k in m["speedup"] else "1×"
            else:  # no teacher rows: each bar against the full LCM at the compared steps
                label = f"{sec / m['methods'][ref]['seconds_per_image']:.2f}" if ref in m["methods"] else ""
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("seconds per image")
        ax.set_title(f"{name} at {m['resolution']}²: " + ("speed-up over the teacher (DPM-Solver++ 25, CFG)"
                                                          if "teacher" in m["methods"] else f"time ÷ {ref}"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
