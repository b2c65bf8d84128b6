"""Is the full LCM's one-step gap (issue 4) the network or the training signal? Probes, not a recipe.

LCD learns f(x_T) at the top grid point by bootstrapping: its target there is the EMA student's own one step from
t = 979. A probe removes the bootstrapping: it takes a distilled full LCM and regresses its one-step output
f_θ(x_T, ω = 6.5, c, 999) directly onto a deterministic solution from the same x_T, on pairs whose noise and
prompts are disjoint from the evaluation's (eval seeds 0…999, pairs from 10,000 up): the teacher's DPM-Solver++ 25
at guidance 7.5 (the bar's reference), or, ~10 × cheaper, the LCM's own deterministic TCD (γ = 0) in a few steps.
Alone it trains the top timestep only (the 2- and 4-step samplers then break); ``--anchor`` also holds the rest of
the grid to the starting model. If even the teacher's target left one step below the bar, the limit would be the
network.

    python benchmarks/scripts/one_step_capacity.py pairs TEACHER OUT.safetensors --start 0 --count 4000
    python benchmarks/scripts/one_step_capacity.py pairs LCM OUT.safetensors --start 20000 --count 48000 --tcd-steps 4
    python benchmarks/scripts/one_step_capacity.py train LCM OUT_DIR --pairs A.safetensors,B.safetensors \
        [--steps 1500 --batch 32 --lr 1e-4 --loss huber --huber-c 0.001 --holdout 500 --cosine --anchor]
then score it: ``lcmkit eval OUT_DIR/pipeline --prompts open --steps 1,2,4 --guidance 7.5 --out OUT_DIR/eval``, and
    python benchmarks/scripts/one_step_capacity.py report RESULTS_DIR --lcd LABEL=BENCH_FOLDER ... \
        --probe LABEL=OUT_DIR ... --teacher-accuracy 0.993
Every command that made benchmarks/results/open/one-step/: benchmarks/scripts/one_step_probes.sh.
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path
from statistics import mean

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lcmkit.denoisers import TextConditioning, consistency_fn, unet_denoiser
from lcmkit.losses import consistency_distance
from lcmkit.math.schedule import alpha_sigma, alphas_cumprod_from_config, append_dims
from lcmkit.math.timesteps import lcm_timesteps, training_grid
from lcmkit.pipelines import (
    encode_prompt,
    encode_unconditional,
    initial_latents,
    load_pipeline,
    sample_teacher,
    teacher_scheduler,
    teacher_timesteps,
)
from lcmkit.solvers import sample_tcd
from lcmkit_world import world
from lcmkit_world.evaluate.run import eval_prompts

PAIR_SEED = 10_000     # noise of pair i: seed PAIR_SEED + i (the evaluation uses seeds 0 … num − 1)
CAPTION_SEED = 100     # captions: eval_prompts(count, seed=CAPTION_SEED + start) (the evaluation uses seed 0)
TEACHER_STEPS, GUIDANCE = 25, 7.5
TOP_T = 999
ORIGINAL_STEPS = 50    # the LCM grid: t = 19, 39, …, 999 (skip 20)


@torch.inference_mode()
def make_pairs(teacher: str, out: Path, start: int, count: int, batch: int = 100, tcd_steps: int = 0) -> None:
    """``count`` (noise, solution) pairs. The solution is the teacher's DPM-Solver++ 25 (guidance 7.5), or with
    ``tcd_steps`` > 0 and a full LCM as ``teacher``, that LCM's deterministic TCD (γ = 0) sampling in that many
    steps (ω = 6.5 through its w-embedding): a smooth map of x_T like the ODE's, ~10 × cheaper."""
    pipe = load_pipeline(teacher, device="cpu")
    ac = alphas_cumprod_from_config(pipe.scheduler.config)
    _, _, captions = eval_prompts(count, seed=CAPTION_SEED + start, prompts="open")
    size = world.IMAGE_SIZE
    noises, latents = [], []
    solver = f"tcd-{tcd_steps}" if tcd_steps else f"dpm-solver++-{TEACHER_STEPS}"
    for lo in tqdm(range(0, count, batch), desc=f"solutions ({solver})"):
        chunk = captions[lo:lo + batch]
        gens = [torch.Generator("cpu").manual_seed(PAIR_SEED + start + lo + i) for i in range(len(chunk))]
        x = initial_latents(pipe, gens, size, size, torch.float32, "cpu")
        cond = encode_prompt(pipe, chunk, size, size)
        if tcd_steps:
            den = unet_denoiser(pipe.unet, ac, cond, w_omega=GUIDANCE - 1.0)
            z0 = sample_tcd(den, x.clone(), lcm_timesteps(tcd_steps, len(ac), ORIGINAL_STEPS), ac, gamma=0.0)
        else:
            uncond = encode_unconditional(pipe, None, len(chunk), size, size, cond)
            den = unet_denoiser(pipe.unet, ac, cond, uncond=uncond, omega=GUIDANCE - 1.0)
            scheduler = teacher_scheduler(pipe, "dpm-solver++")
            z0 = sample_teacher(scheduler, den, x.clone(), teacher_timesteps(scheduler, TEACHER_STEPS, 1.0))
        noises.append(x)
        latents.append(z0.float())
    save_file({"noise": torch.cat(noises), "z0": torch.cat(latents)}, str(out),
              metadata={"captions": json.dumps(captions), "start": str(start), "source": teacher,
                        "solver": solver})
    print(f"wrote {out} ({count} pairs)")


def load_pairs(files: list[str]):
    """(noise, z0, captions, targets): ``targets`` names what made the solutions (one kind per call)."""
    noise, z0, captions, kinds = [], [], [], set()
    for f in files:
        with safe_open(f, "pt") as h:
            meta = h.metadata()
        captions += json.loads(meta["captions"])
        kinds.add(f"{meta['source']} {meta['solver']}" if "solver" in meta else f"teacher dpm-solver++-{TEACHER_STEPS}")
        d = load_file(f)
        noise.append(d["noise"])
        z0.append(d["z0"])
    if len(kinds) != 1:
        raise SystemExit(f"pair files come from different solvers: {sorted(kinds)}")
    return torch.cat(noise), torch.cat(z0), captions, kinds.pop()


def train(lcm: str, out: Path, files: list[str], steps: int, batch: int, lr: float, loss: str, huber_c: float,
          holdout: int = 500, cosine: bool = False, anchor: bool = False, seed: int = 0) -> None:
    """Regress the one-step output onto the teacher's solutions; the last ``holdout`` pairs are never trained on
    and their loss is logged every 250 steps (train loss falling while it stays flat = too few pairs).

    ``anchor``: add (weight 1) the distance of the consistency function at the rest of the grid (t = 19 … 979, one
    draw per sample) to the starting model's (a frozen copy), at z_t = α_t·z0 + σ_t·ε of the pairs' solutions z0:
    the top timestep learns while the 2- and 4-step samplers keep what LCD gave them."""
    pipe = load_pipeline(lcm, device="cpu")
    ac = alphas_cumprod_from_config(pipe.scheduler.config)
    noise, z0, captions, targets = load_pairs(files)
    size = world.IMAGE_SIZE
    with torch.no_grad():
        hidden = torch.cat([encode_prompt(pipe, captions[i:i + 500], size, size).encoder_hidden_states
                            for i in range(0, len(captions), 500)])
    unet = pipe.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)) if cosine else 1.0)
    n_train = len(captions) - holdout
    if anchor:
        frozen = copy.deepcopy(unet).eval().requires_grad_(False)
        grid = training_grid(len(ac), len(ac) // ORIGINAL_STEPS)[:-1]  # all but the top

    def anchor_loss(idx):
        t = grid[torch.randint(0, len(grid), (len(idx),), generator=gen)]
        a, sg = (append_dims(v.float(), 4) for v in alpha_sigma(ac, t))
        z_t = a * z0[idx] + sg * torch.randn(z0[idx].shape, generator=gen)
        cond = TextConditioning(hidden[idx])
        with torch.no_grad():
            ref = consistency_fn(unet_denoiser(frozen, ac, cond, w_omega=GUIDANCE - 1.0))(z_t, t)
        return consistency_distance(consistency_fn(unet_denoiser(unet, ac, cond, w_omega=GUIDANCE - 1.0))(z_t, t),
                                    ref, loss, huber_c)
    top = lambda n: torch.full((n,), TOP_T)  # noqa: E731

    def one_step(idx):
        den = unet_denoiser(unet, ac, TextConditioning(hidden[idx]), w_omega=GUIDANCE - 1.0)
        return consistency_fn(den)(noise[idx], top(len(idx)))

    @torch.no_grad()
    def heldout_loss() -> float:
        unet.eval()
        idx = torch.arange(n_train, len(captions))
        value = mean(float(consistency_distance(one_step(idx[i:i + 100]), z0[idx[i:i + 100]], loss, huber_c))
                     for i in range(0, len(idx), 100))
        unet.train()
        return value
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    log, heldout = [], [(0, heldout_loss())] if holdout else []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="one-step regression")
    for step in bar:
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        value = consistency_distance(one_step(idx), z0[idx], loss, huber_c)
        total = value + anchor_loss(idx) if anchor else value
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append(float(value))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{mean(log[-50:]):.4f}", heldout=f"{heldout[-1][1]:.4f}" if heldout else "-")
        if (step + 1) % 250 == 0 and holdout:
            heldout.append((step + 1, heldout_loss()))
    unet.eval()
    pipe.save_pretrained(out / "pipeline")
    summary = {"lcm": lcm, "pairs": files, "targets": targets, "num_pairs": len(captions), "steps": steps,
               "batch": batch, "lr": lr, "cosine": cosine, "anchor": anchor, "holdout": holdout,
               "heldout_losses": heldout, "loss": loss, "huber_c": huber_c, "seconds": time.perf_counter() - t0,
               "loss_first_50": mean(log[:50]), "loss_last_50": mean(log[-50:]), "losses": log}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    held = f", held-out {heldout[0][1]:.4f} -> {heldout[-1][1]:.4f}" if heldout else ""
    print(f"wrote {out / 'pipeline'}; loss {summary['loss_first_50']:.4f} -> {summary['loss_last_50']:.4f}{held}")


def _lcm_rows(f: Path) -> dict:
    return {r["steps"]: r for r in json.loads(f.read_text())["rows"] if r["method"] == "lcm"}


def _cells(acc: dict, fid: dict) -> list[str]:
    return [f"{acc[k]:.3f} / {fid[k]:.2f}" if k in acc else "—" for k in (1, 2, 4)]


def _pooled(tables: list[dict]) -> dict:
    """Per step count measured in every table: accuracy over all generations ± its binomial standard error, the
    mean world-FID and the number of seeds."""
    out = {}
    for k in sorted(set.intersection(*(set(t) for t in tables))):
        n = sum(t[k]["n"] for t in tables)
        acc = sum(t[k]["accuracy"] * t[k]["n"] for t in tables) / n
        out[k] = {"accuracy": acc, "se": math.sqrt(acc * (1 - acc) / n), "n": n, "seeds": len(tables),
                  "world_fid": mean(t[k]["world_fid"] for t in tables)}
    return out


def _pooled_cell(p: dict, k: int) -> str:
    if k not in p or p[k]["seeds"] < 2:
        return "—"
    return f"{p[k]['accuracy']:.3f} ± {p[k]['se']:.3f} / {p[k]['world_fid']:.2f}"


def report(out: Path, probes: list[tuple[str, Path]], bases: list[tuple[str, Path]], teacher_accuracy: float,
           bar: float, base_seeds: dict[str, list[Path]] | None = None) -> None:
    """capacity.md / .json / .png in ``out`` from the probes' summary.json and eval/eval.json (plus
    eval-seed1/, eval-seed2/ where they exist: pooled columns) and the starting LCD models' bench tables
    (``bases``: LABEL, folder with quality.json; ``base_seeds``: LABEL → their extra-seed eval folders).
    Measures nothing itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_rows = {label: _lcm_rows(d / "quality.json") for label, d in bases}
    base_pooled = {label: _pooled([base_rows[label]] + [_lcm_rows(f / "eval.json") for f in
                                                        (base_seeds or {}).get(label, [])]) for label in base_rows}
    rows = []
    for label, d in probes:
        summary = json.loads((d / "summary.json").read_text())
        ev = _lcm_rows(d / "eval" / "eval.json")
        seeds = [_lcm_rows(f / "eval.json") for f in sorted(d.glob("eval-seed*")) if (f / "eval.json").is_file()]
        rows.append({"probe": label, "folder": str(d), "start": summary["lcm"],
                     "targets": summary.get("targets", f"teacher dpm-solver++-{TEACHER_STEPS}"),
                     "pairs": summary["num_pairs"] - summary.get("holdout", 0), "anchor": summary.get("anchor", False),
                     "steps": summary["steps"], "lr": summary["lr"], "cosine": summary.get("cosine", False),
                     "minutes": summary["seconds"] / 60,
                     "train_loss": [summary["loss_first_50"], summary["loss_last_50"]],
                     "heldout_loss": summary.get("heldout_losses"),
                     "accuracy": {k: v["accuracy"] for k, v in ev.items()},
                     "world_fid": {k: v["world_fid"] for k, v in ev.items()}, "pooled": _pooled([ev] + seeds),
                     "losses": summary["losses"]})
    need = bar * teacher_accuracy
    lines = [f"# One step: can the student learn the map at all? (issue 4's 1-step bar: ≥ {bar} × "
             f"{teacher_accuracy} "
             f"= {need:.3f})", "",
             "Each probe starts from a distilled full LCM and regresses its one-step output f(x_T, ω = 6.5, c, 999) "
             "onto a deterministic solution from the same x_T (pseudo-Huber c = 0.001, batch 32, AdamW), on "
             "pairs whose noise and prompts are disjoint from the evaluation's; `--anchor` also holds the rest of the "
             "grid to the starting model. Scored with `lcmkit eval … --prompts open --guidance 7.5 --num 1000` "
             "(seed 0), accuracy / world-FID.", "",
             "| model | targets | pairs (trained) | anchor | steps, lr | train loss first → last 50 | "
             "held-out loss start → end | 1 step | 2 steps | 4 steps | 1 step, seeds 0–2 pooled | "
             "4 steps, seeds 0–2 pooled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, b in base_rows.items():
        lines.append(f"| {label} (LCD, no probe) | — | — | — | — | — | — | " + " | ".join(
            _cells({k: v["accuracy"] for k, v in b.items()}, {k: v["world_fid"] for k, v in b.items()}))
            + f" | {_pooled_cell(base_pooled[label], 1)} | {_pooled_cell(base_pooled[label], 4)} |")
    for r in rows:
        held = (f"{r['heldout_loss'][0][1]:.4f} → {r['heldout_loss'][-1][1]:.4f}" if r["heldout_loss"]
                and len(r["heldout_loss"]) > 1 else "—")
        lines.append(f"| {r['probe']} | {r['targets']} | {r['pairs']} | {'yes' if r['anchor'] else 'no'} | "
                     f"{r['steps']}, {r['lr']:g}{' cosine' if r['cosine'] else ''} | {r['train_loss'][0]:.4f} → "
                     f"{r['train_loss'][1]:.4f} | {held} | " + " | ".join(_cells(r["accuracy"], r["world_fid"]))
                     + f" | {_pooled_cell(r['pooled'], 1)} | {_pooled_cell(r['pooled'], 4)} |")
    lines += ["", "Without `--anchor` a probe trains the top timestep only, so its 2- and 4-step rows show what that "
              "costs the rest of the grid. Pooled: 3,000 generations (seeds 0, 1, 2; `lcmkit eval … --seed S`), "
              "± one binomial standard error, mean world-FID."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.md").write_text("\n".join(lines) + "\n")
    (out / "capacity.json").write_text(json.dumps({"teacher_accuracy": teacher_accuracy, "bar": bar,
                                                   "starting_models": {k: str(d) for k, d in bases},
                                                   "starting_rows": base_rows, "starting_pooled": base_pooled,
                                                   "probes": rows}, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in rows:
        v = torch.tensor(r["losses"])
        k = min(50, len(v))
        smooth = torch.nn.functional.avg_pool1d(v[None, None], k, 1)[0, 0]
        line, = axes[0].plot(range(k - 1, len(v)), smooth.tolist(), lw=1, label=f"{r['probe']} (train)")
        if r["heldout_loss"] and len(r["heldout_loss"]) > 1:
            axes[0].plot(*zip(*r["heldout_loss"]), "o--", ms=3, color=line.get_color(),
                         label=f"{r['probe']} (held-out)")
    names = [f"{label} (LCD)" for label in base_rows] + [r["probe"] for r in rows]
    values = [b[1]["accuracy"] for b in base_rows.values()] + [r["accuracy"][1] for r in rows]
    axes[1].barh(names, values, color=["gray"] * len(base_rows) + ["C0"] * len(rows))
    axes[1].axvline(need, color="red", ls="--", label=f"bar {need:.3f}")
    axes[0].set(xlabel="step", ylabel="pseudo-Huber loss", title="one-step regression loss")
    axes[1].set(xlabel="1-step prompt accuracy (1,000 open prompts)", xlim=(0.6, 1.0))
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    axes[1].tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=100)
    print(f"wrote {out / 'capacity.md'}, capacity.json, capacity.png")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pairs")
    p.add_argument("teacher")
    p.add_argument("out", type=Path)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--tcd-steps", type=int, default=0, help="TEACHER is a full LCM: its TCD γ = 0 in this many steps")
    t = sub.add_parser("train")
    t.add_argument("lcm")
    t.add_argument("out", type=Path)
    t.add_argument("--pairs", required=True)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--loss", default="huber")
    t.add_argument("--huber-c", type=float, default=0.001)
    t.add_argument("--holdout", type=int, default=500, help="last pairs kept out of training, for a held-out loss")
    t.add_argument("--cosine", action="store_true", help="cosine lr decay to 0 (default constant)")
    t.add_argument("--anchor", action="store_true", help="hold the rest of the grid to the starting model")
    r = sub.add_parser("report")
    r.add_argument("out", type=Path)
    r.add_argument("--lcd", action="append", required=True,
                   help="LABEL=BENCH_FOLDER (split at the last =): a starting LCD model's bench quality table "
                        "(repeatable)")
    r.add_argument("--probe", action="append", required=True, help="LABEL=PROBE_DIR (repeatable)")
    r.add_argument("--teacher-accuracy", type=float, required=True)
    r.add_argument("--bar", type=float, default=0.85)
    r.add_argument("--lcd-seeds", action="append", default=[],
                   help="LABEL=EVAL_DIR (split at the last =): an extra-seed lcmkit eval of a starting model")
    a = ap.parse_args()
    if a.cmd == "pairs":
        make_pairs(a.teacher, a.out, a.start, a.count, tcd_steps=a.tcd_steps)
    elif a.cmd == "report":
        pairs = lambda items: [(x.rsplit("=", 1)[0], Path(x.rsplit("=", 1)[1])) for x in items]  # noqa: E731
        seeds: dict[str, list[Path]] = {}
        for label, folder in pairs(a.lcd_seeds):
            seeds.setdefault(label, []).append(folder)
        report(a.out, pairs(a.probe), pairs(a.lcd), a.teacher_accuracy, a.bar, seeds)
    else:
        train(a.lcm, a.out, a.pairs.split(","), a.steps, a.batch, a.lr, a.loss, a.huber_c, a.holdout, a.cosine,
              a.anchor)
