"""The full-LCM recipe sweep on open prompts, side by side against issue 4's bars.

Reads what `lcmkit bench quality` and `lcmkit eval` wrote (benchmarks/scripts/lcm_recipes.sh runs them) and
writes recipes.json, recipes.md and recipes.png into benchmarks/results/open/recipes/. Nothing is measured
here; every figure comes from those files.

Usage: python benchmarks/scripts/lcm_recipes.py   (from the repository root)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

R = Path("benchmarks/results/open")
OUT = R / "recipes"
SEEDS = (1, 2)  # extra evaluation seeds (prompts and noise); seed 0 is the bench table's
BARS = {1: 0.85, 2: 0.95, 4: 1.0}  # full LCM, × the teacher's accuracy (issue 4)
FID_BAR = 1.3  # 4-step world-FID ≤ 1.3 × the teacher's

#: (folder under R, label): every full LCM with fixed ω = 6.5, batch 32, DDIM k = 20, pseudo-Huber, EMA 0.95,
#: cosine lr, unless the label says otherwise
RECIPES = [
    ("lcm-fixed-omega", "lr 2e-4, 1,800 steps"),
    ("lcm-4500", "lr 2e-4, 4,500 steps"),
    ("lcm-1200", "lr 5e-5, 1,200 steps"),
    ("lcm-lr5e-5", "lr 5e-5, 1,800 steps"),
    ("lcm-3600", "lr 5e-5, 3,600 steps"),
    ("lcm-dpmpp-k50", "lr 5e-5, 1,800 steps, DPM-Solver++ k = 50"),
    ("lcm-top0.25", "lr 5e-5, 1,800 steps, --top-fraction 0.25"),
    ("lcm-top0.9", "lr 5e-5, 1,800 steps, --top-fraction 0.9"),
    ("recipes/lcm-omega10.5", "lr 5e-5, 1,800 steps, fixed ω = 10.5 (scored at guidance 11.5; lcmkit eval)"),
    ("lcm-l2", "lr 5e-5, 1,800 steps, L2 loss (the paper's)"),
    ("lcm-huber-c0.02", "lr 5e-5, 1,800 steps, pseudo-Huber c = 0.02"),
    ("lcm-batch64", "lr 5e-5, 1,800 steps, batch 64"),
    ("lcm-ema0", "lr 5e-5, 1,800 steps, EMA 0 (target = online)"),
]


def table_rows(folder: Path) -> tuple[dict[int, dict], dict]:
    """LCM rows by step count of a bench quality table (quality.json) or of an ``lcmkit eval`` run (eval.json)."""
    name = "quality.json" if (folder / "quality.json").is_file() else "eval.json"
    data = json.loads((folder / name).read_text())
    return {r["steps"]: r for r in data["rows"] if r["method"] == "lcm"}, data


def seed_rows(name: str) -> dict[int, list[dict]]:
    """Per step count, the rows of the extra-seed evaluations that exist (seeds/<name>-seed<S>/eval.json)."""
    out: dict[int, list[dict]] = {}
    for s in SEEDS:
        f = R / "seeds" / f"{name}-seed{s}" / "eval.json"
        if f.is_file():
            for r in json.loads(f.read_text())["rows"]:
                out.setdefault(r["steps"], []).append(r)
    return out


def pooled(rows: list[dict]) -> tuple[float, float, int]:
    """Accuracy over all generations of ``rows``, its binomial standard error, and the count."""
    n = sum(r["n"] for r in rows)
    acc = sum(r["accuracy"] * r["n"] for r in rows) / n
    return acc, math.sqrt(acc * (1 - acc) / n), n


def teacher() -> dict:
    rows = [r for r in json.loads((R / "quality.json").read_text())["rows"]
            if r["method"] == "teacher" and r["solver"] == "dpm-solver++" and r["steps"] == 25]
    extra = seed_rows("teacher").get(25, [])
    acc, se, n = pooled(rows + extra)
    return {"seed0": rows[0]["accuracy"], "fid_seed0": rows[0]["world_fid"], "pooled": acc, "se": se, "n": n,
            "fid_mean": sum(r["world_fid"] for r in rows + extra) / len(rows + extra),
            "seeds": 1 + len(extra)}


def main() -> None:
    t = teacher()
    recipes, machine = [], None
    for folder, label in RECIPES:
        if not any((R / folder / f).is_file() for f in ("quality.json", "eval.json")):
            print(f"skipped {folder}: no quality.json or eval.json yet")
            continue
        rows, data = table_rows(R / folder)
        machine = machine or data.get("machine")
        extra = seed_rows(folder)
        entry = {"folder": folder, "recipe": label, "seed0": {}, "pooled": {}}
        for steps, r in sorted(rows.items()):
            entry["seed0"][steps] = {"accuracy": r["accuracy"], "world_fid": r["world_fid"], "n": r["n"]}
            if steps in extra:
                acc, se, n = pooled([r, *extra[steps]])
                fids = [r["world_fid"]] + [x["world_fid"] for x in extra[steps]]
                entry["pooled"][steps] = {"accuracy": acc, "se": se, "n": n, "world_fid_mean": sum(fids) / len(fids)}
        bars = {}
        for steps, k in BARS.items():
            p = entry["pooled"].get(steps)
            acc = p["accuracy"] if p else entry["seed0"][steps]["accuracy"]
            ref = t["pooled"] if p else t["seed0"]
            bars[f"{steps}-step accuracy ≥ {k} × teacher"] = acc >= k * ref
        p4 = entry["pooled"].get(4)
        fid = p4["world_fid_mean"] if p4 else entry["seed0"][4]["world_fid"]
        bars[f"4-step world-FID ≤ {FID_BAR} × teacher"] = fid <= FID_BAR * (t["fid_mean"] if p4 else t["fid_seed0"])
        entry["bars"] = bars
        recipes.append(entry)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"teacher": t, "recipes": recipes, "machine": machine,
              "note": "seed 0 = the bench quality table (1,000 open prompts); pooled = seed 0 plus the lcmkit eval "
                      "runs at --seed 1 and 2 where they exist (3,000 generations); bars judged on pooled figures "
                      "against the teacher's pooled figures where both exist, else on seed 0"}
    (OUT / "recipes.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "recipes.md").write_text(markdown(result))
    plot(result, OUT / "recipes.png")
    print(f"wrote {OUT}/recipes.json, recipes.md, recipes.png")


def markdown(result: dict) -> str:
    t = result["teacher"]
    lines = [
        "# Full LCM recipes on open prompts against issue 4's bars",
        "",
        f"Teacher DPM-Solver++ 25, guidance 7.5: {t['seed0']:.3f} / world-FID {t['fid_seed0']:.2f} at seed 0; "
        f"{t['pooled']:.3f} ± {t['se']:.3f} over {t['n']:,} generations ({t['seeds']} seeds), mean world-FID "
        f"{t['fid_mean']:.2f}. Bars: 1 / 2 / 4 steps ≥ 0.85 / 0.95 / 1.0 × the teacher, 4-step world-FID ≤ 1.3 ×.",
        "",
        "Accuracy / world-FID at seed 0 (1,000 generations each); pooled = seeds 0, 1, 2 (3,000 generations, ± one "
        "binomial standard error) where measured.",
        "",
        "| recipe | 1 step | 2 steps | 4 steps | 8 steps | 1 step pooled | 4 steps pooled | bars met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in result["recipes"]:
        cells = [f"{e['seed0'][s]['accuracy']:.3f} / {e['seed0'][s]['world_fid']:.2f}" if s in e["seed0"] else "—"
                 for s in (1, 2, 4, 8)]
        pools = [f"{e['pooled'][s]['accuracy']:.3f} ± {e['pooled'][s]['se']:.3f} "
                 f"(FID {e['pooled'][s]['world_fid_mean']:.2f})" if s in e["pooled"] else "—" for s in (1, 4)]
        met = ", ".join(k.split(" ", 1)[0] if "accuracy" in k else "FID" for k, v in e["bars"].items() if v) or "none"
        lines.append(f"| {e['recipe']} (`{e['folder']}/`) | " + " | ".join(cells + pools) + f" | {met} |")
    m = result["machine"] or {}
    lines += ["", f"Machine: {m.get('cpu')} × {m.get('cpu_count')}, torch {m.get('torch')}, one thread per job. "
              "Commands: `benchmarks/scripts/lcm_recipes.sh`.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["teacher"]
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    xs = []
    for e in result["recipes"]:
        x = e["pooled"].get(1, e["seed0"][1])["accuracy"]
        y = e["pooled"].get(4, e["seed0"][4])["accuracy"]
        xs.append(x)
        ax.scatter([x], [y], s=30)
        ax.annotate(e["folder"], (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlim(min(xs) - 0.02, max(xs + [BARS[1] * t["pooled"]]) + 0.08)
    ax.axvline(BARS[1] * t["pooled"], color="grey", ls="--", lw=1)
    ax.axhline(BARS[4] * t["pooled"], color="grey", ls="--", lw=1)
    ax.text(BARS[1] * t["pooled"], ax.get_ylim()[0], " 1-step bar", fontsize=8, color="grey", va="bottom")
    ax.text(ax.get_xlim()[0], BARS[4] * t["pooled"], " 4-step bar", fontsize=8, color="grey", va="bottom")
    ax.set_xlabel("1-step prompt accuracy (pooled where measured)")
    ax.set_ylabel("4-step prompt accuracy (pooled where measured)")
    ax.set_title("Full LCM recipes, open prompts (recipes.md names them)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
