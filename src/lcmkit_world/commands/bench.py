"""``lcmkit bench speed | distill | memory | quality | style | judge``: benchmarks written as JSON + Markdown + PNG
(benchmarks/README.md).

Each writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``--out`` (default ``benchmarks/results``),
recording the machine and the exact command. ``--smoke`` runs the same code on tiny random models in seconds.
"""

from __future__ import annotations

from lcmkit.commands._training import comma_list

DEFAULT_OUT = "benchmarks/results"


def _common(p) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="tiny random models, seconds: checks the bench itself")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: speed, distillation cost, quality (the paper's Table 1)",
                       description="Benchmarks written as JSON + Markdown + PNG, with the machine and command.")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    _register_speed(bench)
    _register_distill(bench)
    _register_memory(bench)
    _register_quality(bench)
    _register_style(bench)
    _register_judge(bench)


def _register_judge(bench) -> None:
    from lcmkit_world.bench.judge import JudgeOptions

    d = JudgeOptions()
    p = bench.add_parser("judge", help="the strict judge on held-out clean, VAE-reconstructed and malformed shapes",
                         description="Validate (and with --calibrate first calibrate) the strict judge: its verdict "
                                     "on held-out clean renders, their VAE reconstructions and every kind of hard "
                                     "negative, world-FID on each, and contact sheets with the verdicts.")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--num", type=int, default=d.num, help=f"clean renders per style and split (default {d.num})")
    p.add_argument("--num-distorted", type=int, default=d.num_distorted,
                   help=f"hard negatives per kind and style (default {d.num_distorted})")
    p.add_argument("--n-real", type=int, default=d.n_real, help=f"real images for world-FID (default {d.n_real})")
    p.add_argument("--calibrate", action="store_true",
                   help="first recalibrate the IoU thresholds and write them into the shipped evaluator (judge.json)")
    p.add_argument("--quantile", type=float, default=d.quantile,
                   help=f"calibration: the quantile of clean/VAE IoUs a threshold sits at (default {d.quantile})")
    p.add_argument("--margin", type=float, default=d.margin, help=f"calibration: subtracted (default {d.margin})")
    p.add_argument("--vae", default=None, help="pipeline folder whose VAE reconstructs (default: the world teacher)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(run=run_judge, bench_parser=p)


def run_judge(args) -> int:
    from lcmkit_world.bench.judge import JudgeOptions, bench_judge

    opts = JudgeOptions(out=args.out, num=args.num, num_distorted=args.num_distorted, n_real=args.n_real,
                        calibrate=args.calibrate, quantile=args.quantile, margin=args.margin, vae=args.vae,
                        threads=args.threads)
    bench_judge(opts)
    print(f"wrote {args.out}/judge.md, judge.json and contact sheets")
    return 0


def _register_speed(bench) -> None:
    p = bench.add_parser("speed", help="seconds per image and UNet evaluations; LCM vs teacher; lcmkit vs diffusers")
    _common(p)
    p.add_argument("--models", type=comma_list(str), default=["world"],
                   help="world, sd15, sdxl (random full-size weights; slow on CPU), comma-separated (default world)")
    p.add_argument("--steps", type=comma_list(int), default=[1, 2, 4, 8], help="LCM step counts (default 1,2,4,8)")
    p.add_argument("--teacher-steps", type=int, default=25, help="teacher DPM-Solver++ steps (default 25)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5 on the world; 1 on sd15/sdxl)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                   help="skip the warm-up run (default: warm up when one UNet forward takes under a second)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet forward (GPU)")
    p.add_argument("--estimate-only", action="store_true", help="time one UNet forward per model, print, stop")
    p.add_argument("--world-teacher", help="world teacher folder (default src/lcmkit_world/assets/world-teacher)")
    p.add_argument("--world-lcm", help="distilled full LCM of the world teacher (pipeline folder)")
    p.add_argument("--world-lora", help="distilled LCM-LoRA of the world teacher (file or lora/ folder)")
    p.add_argument("--warmup", dest="warmup", action="store_true", default=None,
                   help="warm up even when one UNet forward takes over a second")
    p.add_argument("--resolution", type=comma_list(_model_pixels), default=[], metavar="MODEL=PIXELS[,…]",
                   help="sample a model at another square size (default each model's own: world 32, sd15 512, "
                        "sdxl 1024), e.g. sd15=128")
    p.add_argument("--no-teacher", type=comma_list(str), default=[], metavar="MODEL[,…]",
                   help="models measured without the teacher rows (DPM-Solver++ 25 with CFG: 50 UNet evaluations)")
    p.set_defaults(run=run_speed, bench_parser=p)


def _register_distill(bench) -> None:
    p = bench.add_parser("distill", help="seconds per distillation step by phase, peak memory, LoRA parameter counts")
    _common(p)
    p.add_argument("--models", type=comma_list(str), default=["world"], help="world, sd15 (comma-separated)")
    p.add_argument("--modes", type=comma_list(str), default=["full", "lora"], help="full, lora")
    p.add_argument("--solvers", type=comma_list(str), default=["ddim", "dpm-solver", "dpm-solver++"])
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration (default 3; sd15 2)")
    p.add_argument("--batch-size", type=int, default=None, help="per step (default 16 world, 1 sd15)")
    p.add_argument("--world-teacher", help="world teacher folder (default src/lcmkit_world/assets/world-teacher)")
    p.add_argument("--in-process", action="store_true",
                   help="run configurations in this process (no fresh subprocess: peak memory is then cumulative)")
    p.set_defaults(run=run_distill, bench_parser=p)


def _register_memory(bench) -> None:
    from lcmkit_world.bench.memory import DEFAULT_CHECKS, MemoryOptions

    d = MemoryOptions()
    p = bench.add_parser("memory", help="GPU memory of distillation per setting (fake tensors), what fits 24/48/80 GB",
                         description="One distillation step per architecture, mode, precision and checkpointing on "
                                     "fake tensors, every allocation counted; per GPU with AdamW / 8-bit AdamW and "
                                     "FSDP over N GPUs; checked against real peaks of small settings here.")
    _common(p)
    p.add_argument("--archs", type=comma_list(str), default=d.archs, help="sd15, ssd1b, sdxl, tiny, world")
    p.add_argument("--modes", type=comma_list(str), default=d.modes, help="full, lora")
    p.add_argument("--precisions", type=comma_list(str), default=d.precisions, help="fp32, bf16")
    p.add_argument("--batch-size", type=int, default=d.batch, help=f"per GPU (default {d.batch}: diffusers' examples)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: each architecture's own)")
    p.add_argument("--world-sizes", type=comma_list(int), default=d.world_sizes, help="GPUs for FSDP (default 1,8)")
    p.add_argument("--checks", type=comma_list(str), default=list(DEFAULT_CHECKS),
                   help="real steps here, arch-mode-precision-bBATCH[-rRES][-ckpt] (default "
                        f"{','.join(DEFAULT_CHECKS)}); 'none' for none")
    p.set_defaults(run=run_memory, bench_parser=p)


def run_memory(args) -> int:
    from lcmkit_world.bench.memory import SMOKE_CHECKS, MemoryOptions, bench_memory

    _threads(args)
    checks = [] if args.checks == ["none"] else args.checks
    if args.smoke:
        options = MemoryOptions(archs=["tiny"], modes=args.modes, precisions=args.precisions, batch=2,
                                world_sizes=args.world_sizes, checks=SMOKE_CHECKS if checks else [], threads=1)
    else:
        options = MemoryOptions(archs=args.archs, modes=args.modes, precisions=args.precisions, batch=args.batch_size,
                                resolution=args.resolution, world_sizes=args.world_sizes, checks=checks,
                                threads=args.threads)
    result = bench_memory(options, args.out, command(args))
    for name, entry in result["headline"].items():
        cards = ", ".join(f"{c} GB: {entry[str(c)]['setting'] if entry[str(c)] else 'no'}" for c in result["cards_gib"])
        print(f"{name}: {cards}")
    for c in result["checks"]:
        print(f"check {c['check']}: step RSS / estimate {c['ratio_step']:.2f}, total {c['ratio_total']:.2f}")
    print(f"wrote {args.out}/memory.json, memory.md, memory.png")
    return 0


def _register_quality(bench) -> None:
    p = bench.add_parser("quality", help="the LCM paper's Table 1 and ablations on the built-in world")
    _common(p)
    _world_scoring(p)
    p.add_argument("--lcm", help="distilled full LCM (pipeline folder)")
    p.add_argument("--lora", help="distilled LCM-LoRA (file or lora/ folder)")
    p.add_argument("--parts", type=comma_list(str), default=["table", "skip", "guidance"],
                   help="table, skip, guidance (comma-separated; default all)")
    p.add_argument("--methods", type=comma_list(str), default=["reference", "teacher", "control", "lcm-lora", "lcm"],
                   help="table rows to measure: reference (with --reference-guidance), teacher, control (teacher + LCM "
                        "sampler, no CFG), lcm-lora, lcm (default all); the others stay as an earlier run wrote them "
                        "in --out")
    p.add_argument("--budget", type=int, default=1000, help="distillation steps per skip-ablation run")
    p.add_argument("--evals", type=int, default=4, help="checkpoints evaluated per skip-ablation run")
    p.add_argument("--ablation-steps", type=int, default=4,
                   help="LCM steps the skip-ablation checkpoints are scored at (default 4; 1 where 4 saturates)")
    p.add_argument("--skips", type=comma_list(int), default=[1, 5, 10, 20, 50])
    p.add_argument("--solvers", type=comma_list(str), default=["ddim", "dpm-solver", "dpm-solver++"])
    p.add_argument("--omegas", type=comma_list(float), default=[2.0, 4.5, 7.5, 10.5, 14.0],
                   help="paper ω for the guidance ablation (guidance_scale = ω + 1)")
    p.add_argument("--distill-batch-size", type=int, default=32)
    p.add_argument("--guidance", type=float, default=7.5,
                   help="guidance of the teacher rows and the full LCM (diffusers convention, ω = g − 1; default 7.5)")
    p.add_argument("--lora-guidance", type=float, default=1.0, help="guidance of the LCM-LoRA rows (default 1)")
    p.add_argument("--reference-guidance", type=float, default=None,
                   help="the teacher's best guidance: adds the reference row (DPM-Solver++ 25) the quality bars are "
                        "taken against")
    p.add_argument("--teacher-steps", type=comma_list(int), default=[1, 2, 4, 8, 25, 50],
                   help="step counts of the teacher rows (default 1,2,4,8,25,50)")
    p.add_argument("--teacher-solvers", type=comma_list(str), default=["ddim", "dpm-solver", "dpm-solver++"],
                   help="solvers of the teacher rows (default ddim,dpm-solver,dpm-solver++; euler,heun for a "
                        "flow-matching teacher)")
    p.add_argument("--eval-seeds", type=comma_list(int), default=[0],
                   help="evaluation seeds of the table, pooled (default 0; the bars ask for 0,1,2)")
    p.add_argument("--no-sheets", dest="sheets", action="store_false",
                   help="no contact sheets per table row (default: sheets/<method>/ under --out)")
    p.set_defaults(run=run_quality, bench_parser=p)


def _world_scoring(p) -> None:
    """The flags of :class:`lcmkit_world.bench.quality.WorldScoring` (benches that score models on the world)."""
    p.add_argument("--teacher", help="world teacher folder (default: the shipped one for --prompts: "
                                     "src/lcmkit_world/assets/world-teacher, or world-teacher-open for open prompts)")
    p.add_argument("--num", type=int, default=1000, help="generations per row (default 1000)")
    p.add_argument("--n-real", type=int, default=2000, help="real images for world-FID (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", choices=["exact", "open"], default="exact",
                   help="evaluation prompts: exact captions (all five attributes) or open ones (the shape and some of "
                        "the rest, so the caption leaves the image uncertain); default exact")


def _world_scoring_kwargs(args) -> dict:
    return {"teacher": args.teacher, "num": args.num, "n_real": args.n_real, "seed": args.seed, "device": args.device,
            "prompts": args.prompts}


def _register_style(bench) -> None:
    p = bench.add_parser("style", help="a new style on the world: LCF, and style LoRA + LCM-LoRA task arithmetic")
    _common(p)
    # quality and style take the same scoring options through _world_scoring; their own flags differ
    _world_scoring(p)
    p.add_argument("--lcm", help="distilled full LCM (pipeline folder), before fine-tuning")
    p.add_argument("--lcf", help="the same LCM after `lcmkit finetune` on the outlined set (pipeline folder)")
    p.add_argument("--style-lora", help="style LoRA of the teacher (`lcmkit lora train`; file or folder)")
    p.add_argument("--lcm-lora", help="LCM-LoRA of the teacher (file or lora/ folder)")
    p.add_argument("--lambdas", type=comma_list(float), default=[0.4, 0.6, 0.8, 1.0, 1.2],
                   help="style LoRA weights λ1 to sweep (default 0.4,0.6,0.8,1.0,1.2)")
    p.add_argument("--lcm-lora-weight", type=float, default=1.0, help="λ2 (default 1)")
    p.add_argument("--steps", type=int, default=4, help="LCM steps (default 4)")
    p.set_defaults(run=run_style, bench_parser=p)


def command(args) -> str:
    """The command that reproduces this run: ``lcmkit bench NAME`` and every option whose value is not the default
    (rebuilt from the parsed options, so it is the same whether the CLI or a test called ``main``)."""
    import shlex

    parser = args.bench_parser
    words = ["lcmkit", "bench", args.bench]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true / store_false; two flags may share a dest (--warmup / --no-warmup)
            if value == action.const:
                words.append(flag)
        else:
            text = ",".join(_word(v) for v in value) if isinstance(value, list) else str(value)
            words += [flag, text]
    return " ".join(shlex.quote(w) for w in words)


def _word(value) -> str:
    """One item of a comma-separated option as it was typed: 0.5, sd15=128, world."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "=".join(map(str, value))
    return str(value)


def _threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.smoke:
        torch.set_num_threads(1)


def _model_pixels(text: str) -> tuple[str, int]:
    """``sd15=128`` → ("sd15", 128)."""
    model, sep, pixels = text.partition("=")
    if not sep or not model.strip():
        raise ValueError(text)
    return model.strip(), int(pixels)


def run_speed(args) -> int:
    from lcmkit.errors import LcmkitError
    from lcmkit_world.bench.speed import SpeedOptions, bench_speed

    if args.repeats is not None and args.repeats < 1:  # `or` below would turn 0 into the default
        raise LcmkitError(f"--repeats must be positive, got {args.repeats}")

    _threads(args)
    if args.smoke:
        options = SpeedOptions(models=["tiny"], steps=[1, 2, 4], repeats=args.repeats or 2, device="cpu",
                               resolution=dict(args.resolution), no_teacher=args.no_teacher)
    else:
        options = SpeedOptions(models=args.models, steps=args.steps, repeats=args.repeats,
                               device=args.device, dtype=args.dtype, compile=args.compile,
                               world_teacher=args.world_teacher, world_lcm=args.world_lcm, world_lora=args.world_lora,
                               estimate_only=args.estimate_only, warmup=args.warmup, resolution=dict(args.resolution),
                               no_teacher=args.no_teacher)
    options.teacher_steps = args.teacher_steps
    for model in [*options.resolution, *options.no_teacher]:
        if model not in options.models:
            raise LcmkitError(f"--resolution / --no-teacher name {model!r}, which is not among --models "
                              f"{','.join(options.models)}")
    if any(pixels < 8 for pixels in options.resolution.values()):
        raise LcmkitError(f"--resolution must be at least 8 pixels, got {args.resolution}")
    if any(n < 1 for n in options.steps) or options.teacher_steps < 1:
        raise LcmkitError("--repeats, --steps and --teacher-steps must be positive")
    result = bench_speed(options, args.out, command(args))
    for name in options.models:  # the LoRA-over-merged ratios of this run, side by side
        for kind, p in result["models"].get(name, {}).get("lora_vs_merged", {}).items():
            print(f"{name}: {p['method']} / {p['over']} = {p['ratio']:.4f} (± {p['noise']:.4f}, {kind})")
    print(f"speed-up LCM 4 steps vs teacher: {result['speedup_lcm4_vs_teacher_dpmpp25_cfg']}; "
          f"lcmkit/diffusers time ratio: {result['lcmkit_over_diffusers_time_ratio']}; wrote {args.out}/speed.*")
    return 0


def run_distill(args) -> int:
    from lcmkit_world.bench.distill import DistillBenchOptions, bench_distill

    _threads(args)
    if args.smoke:
        options = DistillBenchOptions(models=["tiny"], modes=args.modes, solvers=args.solvers, steps=args.steps or 2,
                                      batch_size=args.batch_size or 2, device="cpu", subprocess=not args.in_process,
                                      threads=1)
    else:
        options = DistillBenchOptions(models=args.models, modes=args.modes, solvers=args.solvers, steps=args.steps,
                                      batch_size=args.batch_size, device=args.device, world_teacher=args.world_teacher,
                                      subprocess=not args.in_process, threads=args.threads)
    result = bench_distill(options, args.out, command(args))
    print("LCM-LoRA trainable parameters: " + ", ".join(
        f"{k} {v['trainable_params'] / 1e6:.1f}M" for k, v in result["lora_trainable_params"].items())
        + f"; wrote {args.out}/distill.*")
    return 0


def run_quality(args) -> int:
    from lcmkit_world.bench.quality import QualityOptions, bench_quality

    _threads(args)
    options = QualityOptions(lcm=args.lcm, lora=args.lora, parts=args.parts, methods=args.methods,
                             ablation_steps=args.ablation_steps, budget=args.budget, evals=args.evals, skips=args.skips,
                             solvers=args.solvers, omegas=args.omegas, distill_batch_size=args.distill_batch_size,
                             guidance=args.guidance, lora_guidance=args.lora_guidance,
                             reference_guidance=args.reference_guidance, seeds=args.eval_seeds, sheets=args.sheets,
                             teacher_steps=args.teacher_steps, teacher_solvers=args.teacher_solvers,
                             **_world_scoring_kwargs(args))
    if args.smoke:
        options = options.smoke()
    result = bench_quality(options, args.out, command(args))
    for claim in result["claims"]:
        print(f"[{claim['verdict']}] {claim['claim']}")
    print(f"wrote {args.out}/quality.*, ablation_skip.*, ablation_guidance.*")
    return 0


def run_style(args) -> int:
    from lcmkit_world.bench.style import StyleOptions, bench_style

    _threads(args)
    options = StyleOptions(lcm=args.lcm, lcf=args.lcf, style_lora=args.style_lora, lcm_lora=args.lcm_lora,
                           lambdas=args.lambdas, lcm_lora_weight=args.lcm_lora_weight, steps=args.steps,
                           **_world_scoring_kwargs(args))
    if args.smoke:
        options = options.smoke()
    result = bench_style(options, args.out, command(args))
    for bar in result["bars"]:
        verdict = "met" if bar["met"] else "not met"
        if "control" in bar:
            print(f"[{verdict}] {bar['row']} beats {bar['control']}: accuracy {bar['accuracy']:.3f} > "
                  f"{bar['control_accuracy']:.3f}, world-FID {bar['world_fid']:.2f} < {bar['control_world_fid']:.2f}")
            continue
        print(f"[{verdict}] {bar['bar']} ({bar['row']}): style rate "
              f"{bar['style_rate']:.3f} >= {bar['style_rate_needed']:.3f}, accuracy {bar['accuracy']:.3f} >= "
              f"{bar['accuracy_needed']:.3f}")
    print(f"wrote {args.out}/style.json, style.md, style.png, style_grid.png")
    return 0
