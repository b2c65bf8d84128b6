"""Rows of ``bench quality`` scored over several evaluation seeds, and the quality bars taken against a reference.

Pooling: each evaluation seed draws its own prompts and initial noise (:func:`lcmkit_world.evaluate.run.evaluate`),
``num`` generations each. A pooled row's ``accuracy`` (the strict verdict), ``attributes``, ``well_formed`` and
``fidelity`` are the means over seeds (equal ``num``, so the mean over all generations); its ``world_fid`` is the
mean of the per-seed FIDs (FID is biased in n, so pooling images into one FID would not compare with a one-seed
row); ``spread`` is half the range of the per-seed accuracies; ``per_seed`` keeps each seed's numbers.

Bars: every ratio is ``accuracy(row) / accuracy(reference)``, the reference being the teacher at its best guidance
with DPM-Solver++ 25 steps (method ``reference``; Euler 25 for a flow-matching teacher, whose bars are
:data:`FLOW_BARS`), scored at the same seeds; FID bars compare ``world_fid(row) / world_fid(reference)``. A bar
``against`` the control compares with the control row at the same step count.
"""

from __future__ import annotations

from dataclasses import dataclass

#: mean over seeds of these row fields
MEANS = ("accuracy", "attributes", "well_formed", "fidelity", "world_fid", "seconds_per_image")


def pool(per_seed: list[list[dict]], seeds: list[int]) -> list[dict]:
    """Rows of one setting grid, one list per seed (same settings in the same order) → pooled rows."""
    pooled = []
    for rows in zip(*per_seed):
        first = rows[0]
        row = dict(first)
        for key in MEANS:
            values = [r[key] for r in rows if r.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        row["n"] = sum(r["n"] for r in rows)
        accs = [r["accuracy"] for r in rows]
        row["spread"] = (max(accs) - min(accs)) / 2
        row["seeds"] = list(seeds)
        row["per_seed"] = [{"seed": s, "accuracy": r["accuracy"], "world_fid": r["world_fid"]}
                           for s, r in zip(seeds, rows)]
        pooled.append(row)
    return pooled


@dataclass(frozen=True)
class Bar:
    method: str        # "lcm" or "lcm-lora"
    steps: int
    ratio: float       # accuracy(method, steps) ≥ ratio × accuracy(reference); or, for fid, FID ≤ ratio × FID(ref)
    fid: bool = False
    against: str = "reference"  # or "control": the undistilled teacher with the LCM sampler at the same steps


#: the quality bars of the strict re-measurement (accuracy ratios; one FID ratio per model at 4 steps)
BARS = (Bar("lcm", 4, 1.0), Bar("lcm", 2, 0.95), Bar("lcm", 1, 0.85),
        Bar("lcm-lora", 4, 0.95), Bar("lcm-lora", 2, 0.9), Bar("lcm-lora", 1, 0.75),
        Bar("lcm", 4, 1.3, fid=True), Bar("lcm-lora", 4, 1.3, fid=True))
#: flow-matching teachers (reference: Euler 25): the LCM-LoRA at 4 and 2 steps against the reference, at one step
#: against the control
FLOW_BARS = (Bar("lcm-lora", 4, 0.95), Bar("lcm-lora", 2, 0.9), Bar("lcm-lora", 1, 2.0, against="control"))
#: reference-row solvers of flow-matching teachers
FLOW_REFERENCE_SOLVERS = ("euler", "heun")


def _find(rows, **match):
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


def bars(rows: list[dict]) -> list[dict]:
    """Each bar of :data:`BARS` judged on ``rows`` against the ``reference`` row: what was needed, what was measured,
    met or not. Bars whose rows are missing are left out."""
    ref = _find(rows, method="reference")
    if ref is None:
        return []
    out = []
    for bar in FLOW_BARS if ref.get("solver") in FLOW_REFERENCE_SOLVERS else BARS:
        row = _find(rows, method=bar.method, steps=bar.steps)
        base = ref if bar.against == "reference" else _find(rows, method=bar.against, steps=bar.steps)
        if row is None or base is None:
            continue
        metric = "world_fid" if bar.fid else "accuracy"
        need, got = bar.ratio * base[metric], row[metric]
        # a multiple of a zero base is met only by beating it: "2 × a control at 0" asks for more than 0
        met = got <= need if bar.fid else (got >= need and (need > 0 or got > base[metric]))
        out.append({"method": bar.method, "steps": bar.steps, "metric": metric, "against": bar.against,
                    "ratio": bar.ratio, "needed": need, "measured": got,
                    "of_reference": got / max(ref[metric], 1e-12), "met": met, "n": row["n"],
                    "spread": row.get("spread")})
    return out


def bars_markdown(rows: list[dict]) -> str:
    """The bars as a Markdown table (empty when there is no reference row)."""
    judged = bars(rows)
    ref = _find(rows, method="reference")
    if not judged:
        return ""
    solver = {"dpm-solver++": "DPM-Solver++", "euler": "Euler", "heun": "Heun"}.get(ref["solver"], ref["solver"])
    lines = [f"Reference: the teacher at guidance {ref['guidance']:g}, {solver} {ref['steps']} steps: strict "
             f"accuracy {ref['accuracy']:.3f}, world-FID {ref['world_fid']:.2f} (n = {ref['n']}).", "",
             "| model | steps | bar | needed | measured | × reference | met |", "|---|---|---|---|---|---|---|"]
    for b in judged:
        sign = "≤" if b["metric"] == "world_fid" else "≥"
        what = "world-FID" if b["metric"] == "world_fid" else "accuracy"
        spread = f" ± {b['spread']:.3f}" if b["metric"] == "accuracy" and b.get("spread") else ""
        base = "ref" if b.get("against", "reference") == "reference" else b["against"]
        lines.append(f"| {b['method']} | {b['steps']} | {what} {sign} {b['ratio']:g} × {base} | {b['needed']:.3f} | "
                     f"{b['measured']:.3f}{spread} | {b['of_reference']:.3f} | {'met' if b['met'] else '**not met**'} |")
    return "\n".join(lines) + "\n"
