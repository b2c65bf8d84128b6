"""Join the universal-acceleration rows into one table: benchmarks/results/universal/universal.{json,md,png}.

    python benchmarks/scripts/universal_table.py TRANSFER_QUALITY_JSON NATIVE_QUALITY_JSON OUT_DIR

TRANSFER is a `bench quality --methods lcm-lora` run whose LoRA was distilled on another teacher than the one it is
scored on; NATIVE is the fine-tuned model's own table (reference, teacher DPM-Solver++, control, its own LCM-LoRA).
Every row keeps the command that measured it; ratios are taken against NATIVE's reference row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = (1, 2, 4)


def pick(rows: list[dict], method: str, solver: str | None = None) -> dict[int, dict]:
    return {r["steps"]: r for r in rows if r["method"] == method and (solver is None or r["solver"] == solver)}


def main(transfer_path: str, native_path: str, out: str) -> None:
    transfer, native = json.loads(Path(transfer_path).read_text()), json.loads(Path(native_path).read_text())
    ref = pick(native["rows"], "reference")[25]
    groups = [  # (label, rows by steps, command)
        ("fine-tuned model, DPM-Solver++, guidance 1.5 (its best)", pick(native["rows"], "teacher", "dpm-solver++"),
         native["measured_by"]["teacher"]),
        ("fine-tuned model, LCM sampler, no LoRA (control)", pick(native["rows"], "control"),
         native["measured_by"]["control"]),
        ("+ LCM-LoRA distilled on the fine-tuned model itself (native)", pick(native["rows"], "lcm-lora"),
         native["measured_by"]["lcm-lora"]),
        ("+ LCM-LoRA distilled on its base model, no training (transfer)", pick(transfer["rows"], "lcm-lora"),
         transfer["measured_by"]["lcm-lora"]),
    ]
    table = []
    for label, rows, command in groups:
        for s in (*STEPS, 25):
            if s in rows:
                r = rows[s]
                table.append({"row": label, "steps": s, "accuracy": r["accuracy"], "attributes": r["attributes"],
                              "well_formed": r["well_formed"], "world_fid": r["world_fid"],
                              "n": r["n"], "of_reference": r["accuracy"] / ref["accuracy"], "command": command})
    result = {"reference": {"accuracy": ref["accuracy"], "world_fid": ref["world_fid"], "n": ref["n"]},
              "machine": transfer["machine"], "rows": table}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "universal.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "universal.md").write_text(markdown(result))
    plot(result, out_dir / "universal.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    ref = result["reference"]
    lines = ["# LCM-LoRA as a universal acceleration module (open prompts, strict judge)", "",
             f"Reference: the fine-tuned model (world-teacher-open) at its best guidance 1.5, DPM-Solver++ 25: "
             f"strict accuracy {ref['accuracy']:.3f}, world-FID {ref['world_fid']:.2f} (n = {ref['n']}).", "",
             "| row | steps | strict accuracy | × reference | attributes | well formed | world-FID | n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['steps']} | {r['accuracy']:.3f} | {r['of_reference']:.3f} | "
                     f"{r['attributes']:.3f} | {r['well_formed']:.3f} | {r['world_fid']:.2f} | {r['n']} |")
    lines += ["", "Commands:", ""]
    for command in dict.fromkeys(r["command"] for r in result["rows"]):
        lines.append(f"- `{command}`")
    m = result["machine"]
    lines += ["", f"Machine: {m.get('cpu', m)}; the rows are accuracies, not timings.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label in dict.fromkeys(r["row"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["row"] == label and r["steps"] in STEPS]
        ax.plot([r["steps"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=label)
    ax.axhline(result["reference"]["accuracy"], color="k", ls="--", lw=1, label="reference: DPM-Solver++ 25")
    ax.set_xscale("log", base=2)
    ax.set_xticks(STEPS, [str(s) for s in STEPS])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("strict accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:4])
