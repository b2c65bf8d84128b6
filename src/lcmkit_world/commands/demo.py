"""``lcmkit demo``: distil the shipped world teacher and compare it with the teacher's own solvers."""

from __future__ import annotations


def register(sub) -> None:
    from lcmkit_world.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="distil an LCM-LoRA from the built-in world teacher and report (≈10 min, CPU)",
                       description="Distils the world teacher shipped with lcmkit, then writes OUT/grid.png (rows: "
                                   "prompts; columns: teacher DPM-Solver++ 25 steps, teacher DDIM 4 steps, the "
                                   "undistilled teacher with the LCM sampler at 1 step (the control), the distilled "
                                   "model at 1, 2 and 4 steps) and OUT/report.md. Open prompts by default.")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--mode", choices=["lora", "full"], default=d.mode, help="LCM-LoRA (default) or full LCM")
    p.add_argument("--steps", type=int, default=d.max_steps, dest="max_steps",
                   help=f"distillation steps (default {d.max_steps}; more = a longer, better run)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ema", type=float, default=d.ema,
                   help=f"target EMA rate mu (default {d.ema}; LoRA: --lora-ema of lcmkit distill; 0 = the online "
                        "target of the LCM-LoRA scripts)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=d.lr_schedule,
                   help=f"after a short warm-up (default {d.lr_schedule})")
    p.add_argument("--num", type=int, default=d.num, help=f"generations per column for the metrics (default {d.num})")
    p.add_argument("--teacher", default=d.teacher,
                   help="teacher pipeline folder (default: the shipped world teacher for --prompts)")
    p.add_argument("--prompts", choices=["exact", "open"], default=d.prompts,
                   help=f"distil on and score with exact captions or open ones (the shape and some of the other "
                        f"attributes named; default {d.prompts})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="replace a finished demo in --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.set_defaults(run=run)


def run(args) -> int:
    from lcmkit_world.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, mode=args.mode, teacher=args.teacher, max_steps=args.max_steps,
                     batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, ema=args.ema, num=args.num,
                     seed=args.seed, prompts=args.prompts,
                     overwrite=args.overwrite, resume=args.resume)
    out = run_demo(cfg)
    print((out / "report.md").read_text(), end="")
    print(f"\nwrote {out / 'grid.png'} and {out / 'report.md'}")
    return 0
