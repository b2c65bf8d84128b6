"""Why a held fuse samples slower than the merged copy on SD 1.5's architecture here: the same merged copy, sampled
while a fuse of the teacher is held, against itself with nothing held (benchmarks/results/speed-fused/README.md).

Rows, interleaved with the order rotated each round, LCM 4 steps at guidance 1 (one image, seed 0):
  merged                     the LCM-LoRA merged into a copy of the teacher's UNet, nothing fused anywhere
  held                       the teacher with the LoRA fused (applied_loras) around the call
  merged_while_held          the merged copy, while the teacher's fuse is held (its saved originals alive)
  merged_after_fuse_restore  the merged copy, right after a fuse and restore of the teacher
Per row: user and system CPU seconds and minor/major page faults of the call (getrusage), medians over rounds.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/scripts/fused_memory_check.py OUT.json [PIXELS] [ROUNDS]
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from lcmkit.pipelines import applied_loras, generate
from lcmkit_world.bench import machine
from lcmkit_world.bench.speed import SpeedOptions, merged_lora_pipeline
from lcmkit_world.bench.subjects import load_subject


def main(out: str, pixels: int = 64, rounds: int = 5) -> None:
    torch.set_num_threads(1)
    subject = load_subject("sd15", Path(tempfile.mkdtemp()), SpeedOptions(models=["sd15"]))
    merged = merged_lora_pipeline(subject.teacher, subject.lora)
    lora = [str(subject.lora)]

    def sample(pipe) -> dict:
        a = resource.getrusage(resource.RUSAGE_SELF)
        generate(pipe, "a red circle on blue", steps=4, guidance=1.0, height=pixels, width=pixels, progress=False,
                 output_type="np")
        b = resource.getrusage(resource.RUSAGE_SELF)
        return {"user_s": b.ru_utime - a.ru_utime, "system_s": b.ru_stime - a.ru_stime,
                "minor_faults": b.ru_minflt - a.ru_minflt, "major_faults": b.ru_majflt - a.ru_majflt}

    def held(pipe):
        with applied_loras(subject.teacher, lora):
            return sample(pipe)

    def after_restore():
        applied_loras(subject.teacher, lora).remove()
        return sample(merged)

    runs = {"merged": lambda: sample(merged), "held": lambda: held(subject.teacher),
            "merged_while_held": lambda: held(merged), "merged_after_fuse_restore": after_restore}
    info = machine.machine_info()
    samples = machine.interleaved(runs, rounds, warmup=True)
    info["load_average_end"] = machine.load_average()
    result = {"command": " ".join(["python", *sys.argv]), "machine": info, "pixels": pixels, "rounds": rounds,
              "rows": {name: {k: statistics.median(s[k] for s in rows) for k in rows[0]} | {"samples": rows}
                       for name, rows in samples.items()}}
    Path(out).write_text(json.dumps(result, indent=2))
    for name, row in result["rows"].items():
        print(name, {k: round(v, 3) for k, v in row.items() if k != "samples"})


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
