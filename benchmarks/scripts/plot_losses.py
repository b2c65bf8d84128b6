"""Loss curves of training runs (their logs/log.jsonl), one panel per run, into one PNG.

Usage: python benchmarks/scripts/plot_losses.py OUT.png NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

import json
import sys
from pathlib import Path

from lcmkit_world.teacher import plot_losses


def losses(run: Path) -> tuple[list[float], int]:
    """The logged losses and the steps between two records."""
    rows = [json.loads(line) for line in (run / "logs" / "log.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    return [r["loss"] for r in rows], rows[1]["step"] - rows[0]["step"]


if __name__ == "__main__":
    out, runs = Path(sys.argv[1]), [a.split("=", 1) for a in sys.argv[2:]]
    curves = {name: losses(Path(run)) for name, run in runs}
    every = {e for _, e in curves.values()}
    if len(every) != 1:
        raise SystemExit(f"runs log every {sorted(every)} steps; plot runs with the same log interval together")
    plot_losses({name: c for name, (c, _) in curves.items()}, out, step_every=every.pop())
    print(f"wrote {out}")
