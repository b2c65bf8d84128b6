"""GPU acceptance run (issue 21 item 6): ``bash benchmarks/gpu.sh [OUTDIR]`` calls this; see benchmarks/README.md.

Parts, each in its own subprocess under its own time box (its peak CUDA memory is its own, and a part that fails
or runs over is recorded as such while the others still run); ``gpu.json`` and ``gpu.md`` are rewritten after
every part, so what finished is on disk whatever comes after:

- ``pytest``: ``pytest -m cuda tests/gpu``, log in ``pytest.txt``;
- ``distill-sd15`` / ``distill-sdxl``: LCM-LoRA distillation steps (rank 64, DDIM teacher step, k = 20) in bf16
  autocast on random-weight SD 1.5 / SDXL architectures (``lcmkit_world.bench.configs``), cached latents and
  text (no VAE encode): steps/s, images/s, ``torch.cuda.max_memory_allocated``, the split by phase, and
  ``lcmkit bench memory``'s fake-tensor estimate of the same step's peak beside the measured one;
- ``latency-sd15`` / ``latency-sdxl``: 4-step LCM, one image at 512² (a full LCM, ``LatentConsistencyModelPipeline``)
  and 1024² (SDXL + ``LCMScheduler``, guidance 1: the cost of a fused LCM-LoRA), fp16, lcmkit's ``generate``
  against diffusers' pipeline call on the same weights: warm-up, interleaved rounds, median seconds;
- ``fsdp``: recorded as not implemented (lcmkit has no FSDP yet).

``--smoke``: the same code on the tiny architecture, on CPU when there is no GPU, in seconds (tests/world).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's lcmkit, installed or not

import torch  # noqa: E402

PARTS = ("pytest", "distill-sd15", "distill-sdxl", "latency-sd15", "latency-sdxl", "fsdp")
#: seconds per part on the GPU (the whole run stays under 8 minutes: 420 s of parts + start-up)
BOXES = {"pytest": 75, "distill-sd15": 80, "distill-sdxl": 120, "latency-sd15": 55, "latency-sdxl": 90, "fsdp": 5}
SMOKE_BOX = 120
PROMPT = "a photograph of an astronaut riding a horse"


# ---------------------------------------------------------------------------------------------------------------
# Parts (run in a child process: ``gpu.py --part NAME``; JSON on the last line of stdout)
# ---------------------------------------------------------------------------------------------------------------

def _device(smoke: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _arch(name: str, smoke: bool):
    """The architecture of a part; under ``--smoke`` a tiny one of the same family (SD or SDXL)."""
    from dataclasses import replace

    from lcmkit_world.bench import configs

    if not smoke:
        return configs.ARCHITECTURES[name]
    if name != "sdxl":
        return configs.TINY
    text = dict(configs.TINY.text_encoders[0])  # two width-32 encoders: cross-attention 64, pooled 32
    unet = dict(configs.TINY.unet, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=(1, 1))
    tiny_xl = replace(configs.TINY, name="tiny-xl", sdxl=True, unet=unet, text_encoders=(text, text))
    configs.ARCHITECTURES.setdefault(tiny_xl.name, tiny_xl)  # so the memory estimate finds it by name
    return tiny_xl


def _sdxl_batch(device) -> int:
    """12 (diffusers' example batch) where the estimate (~118 GB without checkpointing) fits, else 4."""
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return 12 if total >= 130 * 2**30 else 4


def _conditioning(pipe, sdxl: bool, batch: int, resolution: int, device):
    from lcmkit.denoisers import TextConditioning
    from lcmkit.train.encode import encode_text

    hidden, pooled = encode_text(pipe, "sdxl" if sdxl else "sd", [PROMPT] * batch)
    hidden = hidden.to(device)
    if sdxl:  # as lcmkit.train.encode.Encoder: zero unconditional embeddings, the same time ids
        pooled = pooled.to(device)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                dtype=hidden.dtype, device=device)
        return (TextConditioning(hidden, pooled, time_ids),
                TextConditioning(torch.zeros_like(hidden), torch.zeros_like(pooled), time_ids))
    empty, _ = encode_text(pipe, "sd", [""])
    return TextConditioning(hidden), TextConditioning(empty.to(device).expand_as(hidden))


def memory_estimate(arch_name: str, batch: int, resolution: int) -> dict:
    """``lcmkit bench memory``'s estimate (fake tensors, CUDA autocast policy) of one LoRA bf16 step's peak with
    cached latents and text, no gradient checkpointing, one GPU, AdamW."""
    from lcmkit_world.bench import memory, memtrack

    spec = memtrack.StepSpec(arch_name, "lora", "bf16", False, batch, resolution, encode=False)
    start = time.perf_counter()
    m = memtrack.run_step(spec, fake=True, grad_shards=(1,))
    est = memory.per_gpu(m, "adamw", 1)
    return {"peak_mb": est["peak"] / 2**20, "peak_phase": est["peak_phase"], "seconds": time.perf_counter() - start}


def part_distill(name: str, smoke: bool, deadline: float) -> dict:
    from lcmkit.pipelines import vae_scale_factor
    from lcmkit.train.config import OptimConfig
    from lcmkit.train.distill import build_models
    from lcmkit.train.optim import make_optimizer
    from lcmkit.train.rng import generator_for
    from lcmkit_world.bench import configs
    from lcmkit_world.bench.distill import PhaseClock, RecipeSettings, check_forwards, one_step

    device = _device(smoke)
    arch = _arch(name, smoke)
    batch = 2 if smoke else (12 if name == "sd15" else _sdxl_batch(device))
    max_steps = 3 if smoke else 8
    t0 = time.perf_counter()
    pipe = configs.build_pipeline(arch)
    settings = RecipeSettings("lora", f"random {arch.name}", 64, 64.0, mixed_precision="bf16")
    models = build_models(settings, pipe, device, generator_for(0, 1))
    optimizer = make_optimizer(models.trainable(), OptimConfig(lr=1e-5, warmup_steps=0))
    latent = pipe.unet.config.sample_size
    resolution = latent * vae_scale_factor(pipe)
    z0 = torch.randn(batch, pipe.unet.config.in_channels, latent, latent,
                     generator=torch.Generator().manual_seed(0)).to(device)
    cond, uncond = _conditioning(pipe, arch.sdxl, batch, resolution, device)
    build_seconds = time.perf_counter() - t0
    models_mb = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = []
    while len(steps) < max_steps:
        clock = PhaseClock({models.teacher, models.student, models.target}, device)
        _sync(device)
        start = time.perf_counter()
        loss = one_step(models, optimizer, clock, z0, cond, uncond, "ddim", 20, len(steps))
        seconds = time.perf_counter() - start
        clock.close()
        check_forwards(clock.forwards, "ddim", batch)
        steps.append({"seconds": seconds, "loss": loss, "phases": dict(clock.seconds)})
        if len(steps) >= 3 and time.time() + 2 * seconds > deadline - 20:  # keep time for the estimate
            break
    measured = steps[1:] or steps  # the first step also allocates AdamW's state
    per_step = sorted(s["seconds"] for s in measured)[len(measured) // 2]
    result = {"architecture": arch.name, "device": str(device), "mode": "lora", "lora_rank": 64,
              "mixed_precision": "bf16", "solver": "ddim", "skip": 20, "batch_size": batch, "resolution": resolution,
              "build_seconds": build_seconds, "steps_measured": len(measured), "seconds_per_step": per_step,
              "steps_per_second": 1 / per_step, "images_per_second": batch / per_step,
              "phases": {p: sorted(s["phases"][p] for s in measured)[len(measured) // 2]
                         for p in measured[0]["phases"]},
              "losses": [s["loss"] for s in steps], "losses_finite": all(math.isfinite(s["loss"]) for s in steps),
              "models_mb": models_mb,
              "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}
    print(json.dumps({"partial": result}), flush=True)  # what the parent keeps if the estimate runs over
    del models, optimizer, pipe
    try:
        est = memory_estimate(arch.name, batch, resolution)
        result["estimate"] = est
        if result["peak_mb"]:
            result["estimate_over_measured"] = est["peak_mb"] / result["peak_mb"]
    except Exception as e:  # the measurement stands without it
        result["estimate"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def part_latency(name: str, smoke: bool, deadline: float) -> dict:
    import numpy as np
    from diffusers import LCMScheduler

    from lcmkit.pipelines import generate
    from lcmkit_world.bench import configs

    device = _device(smoke)
    arch = _arch(name, smoke)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    full_lcm = not arch.sdxl  # SD 1.5: a full LCM (w-embedding); SDXL: the base + LCMScheduler, guidance 1
    pipe = configs.build_pipeline(arch, full_lcm=full_lcm)
    if arch.sdxl:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device, dtype)
    guidance = 8.0 if full_lcm else 1.0
    size = arch.resolution

    def lcmkit_run():
        return generate(pipe, PROMPT, steps=4, guidance=guidance, seed=0, height=size, width=size, device=device,
                        progress=False, output_type="np")

    def diffusers_run():
        return pipe(PROMPT, num_inference_steps=4, guidance_scale=guidance, height=size, width=size,
                    generator=torch.Generator(device).manual_seed(0), output_type="np").images

    runs = {"lcmkit": lcmkit_run, "diffusers": diffusers_run}
    times = {k: [] for k in runs}
    images = {}
    for k, f in runs.items():  # warm-up: kernels chosen, allocator grown, lazy imports done
        images[k] = f()
        f()
    rounds, last = 0, 0.0
    while rounds < (3 if smoke else 10):
        for k in (list(runs) if rounds % 2 == 0 else list(runs)[::-1]):
            _sync(device)
            start = time.perf_counter()
            runs[k]()
            _sync(device)
            times[k].append(time.perf_counter() - start)
        rounds += 1
        last = sum(t[-1] for t in times.values())
        if rounds >= 3 and time.time() + 2 * last > deadline - 5:
            break
    med = {k: _median(v) for k, v in times.items()}
    a, b = (np.asarray(images[k], dtype=np.float64) for k in ("lcmkit", "diffusers"))
    return {"architecture": arch.name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "model": "full LCM (LatentConsistencyModelPipeline)" if full_lcm else "SDXL + LCMScheduler, guidance 1",
            "resolution": size, "steps": 4, "guidance": guidance, "rounds": rounds, "seconds": times,
            "median_seconds": med, "lcmkit_over_diffusers": med["lcmkit"] / med["diffusers"],
            "images_finite": bool(np.isfinite(a).all() and np.isfinite(b).all()),
            "same_image_max_abs_diff": float(np.nanmax(np.abs(a - b)))}


def run_part(part: str, smoke: bool, deadline: float) -> dict:
    if part.startswith("distill-"):
        return part_distill(part.split("-", 1)[1], smoke, deadline)
    if part.startswith("latency-"):
        return part_latency(part.split("-", 1)[1], smoke, deadline)
    raise SystemExit(f"unknown part {part}")


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    import platform

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "host": platform.node(), "cpus": os.cpu_count(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # recorded, not fatal: the parts that need it fail on their own
            info[name] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_capability=f"{p.major}.{p.minor}",
                    gpu_multiprocessors=p.multi_processor_count)
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            pass
    return info


def _child(cmd: list[str], box: float, log_path: Path | None = None) -> tuple[int | None, str, float]:
    """Run ``cmd`` in its own process group for at most ``box`` seconds: (returncode or None on timeout, output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=box)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    if log_path is not None:
        log_path.write_text(out)
    return code, out, time.perf_counter() - start


def part_pytest(out_dir: Path, smoke: bool, box: float) -> dict:
    # the CUDA tests live in tests/gpu: collecting only there keeps a module elsewhere that fails to import on the
    # GPU machine (a package it lacks) from stopping the run before any test
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    code, out, seconds = _child(cmd, box, out_dir / "pytest.txt")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    return {"status": "timed out" if code is None else ("ok" if code == 0 else f"exit {code}"),
            "command": " ".join(cmd[1:]), "seconds": seconds, "counts": counts, "log": "pytest.txt",
            "tail": out.strip().splitlines()[-3:]}


def run_isolated(part: str, smoke: bool, box: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--deadline", str(time.time() + box)]
    code, out, seconds = _child(cmd + (["--smoke"] if smoke else []), box)
    found = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if code == 0 and found:
        return dict(found[-1], status="ok", seconds=seconds)
    partial = next((f["partial"] for f in reversed(found) if "partial" in f), {})
    lines = [line for line in out.strip().splitlines() if not line.startswith("{")]
    return dict(partial, status="timed out" if code is None else f"exit {code}", seconds=seconds, box_seconds=box,
                error=lines[-6:])


def markdown(result: dict) -> str:
    m, parts = result["machine"], result["parts"]
    text = ["# lcmkit GPU acceptance run" + (" (smoke: tiny models, not a measurement)" if result["smoke"] else ""),
            "", f"`{result['command']}` · {m['date_utc']} UTC · {m.get('gpu', 'no GPU')} "
            f"({m.get('gpu_memory_gib', '-')} GiB) · torch {m['torch']} (CUDA {m['cuda']}) · diffusers {m['diffusers']}"
            f" · transformers {m['transformers']} · peft {m['peft']} · {result.get('total_seconds', 0):.0f} s in all",
            "", "| part | status | seconds |", "|---|---|---|"]
    text += [f"| {k} | {v.get('status')} | {v.get('seconds', 0):.1f} |" for k, v in parts.items()]
    if "pytest" in parts:
        text += ["", f"pytest -m cuda: {parts['pytest'].get('counts')}"]
    rows = [(k, v) for k, v in parts.items() if k.startswith("distill-") and "seconds_per_step" in v]
    if rows:
        text += ["", "LCM-LoRA distillation, bf16 autocast, rank 64, DDIM teacher, cached latents (median step after the "
                 "first):", "", "| arch | batch | res | s/step | steps/s | images/s | peak MiB | estimate MiB | est/meas |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for k, v in rows:
            est = v.get("estimate", {})
            text.append(f"| {v['architecture']} | {v['batch_size']} | {v['resolution']} | {v['seconds_per_step']:.3f} | "
                        f"{v['steps_per_second']:.2f} | {v['images_per_second']:.1f} | {_f(v.get('peak_mb'))} | "
                        f"{_f(est.get('peak_mb'))} | {_f(v.get('estimate_over_measured'), 2)} |")
    rows = [(k, v) for k, v in parts.items() if k.startswith("latency-") and "median_seconds" in v]
    if rows:
        text += ["", "4-step LCM latency, one image (median of interleaved rounds after warm-up):", "",
                 "| arch | model | res | dtype | lcmkit s | diffusers s | lcmkit/diffusers | max |Δ| image |",
                 "|---|---|---|---|---|---|---|---|"]
        for k, v in rows:
            s = v["median_seconds"]
            text.append(f"| {v['architecture']} | {v['model']} | {v['resolution']} | {v['dtype']} | {s['lcmkit']:.4f} | "
                        f"{s['diffusers']:.4f} | {v['lcmkit_over_diffusers']:.3f} | {v['same_image_max_abs_diff']:.2g} |")
    if "fsdp" in parts:
        text += ["", f"FSDP on one GPU: {parts['fsdp']['status']} — {parts['fsdp'].get('note', '')}"]
    return "\n".join(text) + "\n"


def _f(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write(out_dir: Path, result: dict) -> None:
    for name, text in (("gpu.json", json.dumps(result, indent=1, default=str) + "\n"), ("gpu.md", markdown(result))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_dir / name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--smoke", action="store_true", help="tiny models, CPU without a GPU, seconds")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=450, help="seconds for all parts together (default 450)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:  # a child: one part, its JSON on the last line
        print(json.dumps(run_part(args.part, args.smoke, args.deadline or time.time() + 600), default=str))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = {"bench": "gpu", "smoke": args.smoke, "command": "bash benchmarks/gpu.sh " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "parts": {}}
    write(out_dir, result)
    for part in parts:
        left = args.budget - (time.time() - start)
        box = min(SMOKE_BOX if args.smoke else BOXES[part], left)
        print(f"[gpu] {part} (at most {box:.0f} s) …", flush=True)
        if part == "fsdp":
            result["parts"][part] = {"status": "not implemented", "seconds": 0.0,
                                     "note": "lcmkit has no FSDP yet (issue 21 item 4); nothing was run"}
        elif box < 10:
            result["parts"][part] = {"status": "skipped: no time left in the budget", "seconds": 0.0}
        elif part == "pytest":
            result["parts"][part] = part_pytest(out_dir, args.smoke, box)
        else:
            result["parts"][part] = run_isolated(part, args.smoke, box)
        result["total_seconds"] = time.time() - start
        write(out_dir, result)
        print(f"[gpu] {part}: {result['parts'][part].get('status')} ({result['parts'][part].get('seconds', 0):.1f} s)",
              flush=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
