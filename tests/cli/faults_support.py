"""What the fault suites (tests/cli/test_faults*.py) share: the report, the CLI runners, malicious pickles.

Each case appends one record (kind, case, ok, ...) to the JSON-lines file named by ``LCMKIT_FAULTS_REPORT``;
``python benchmarks/faults.py`` collects them into benchmarks/results/faults.{json,md}. Kinds are listed in
benchmarks/faults.py (``KINDS``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

from lcmkit.cli import main as cli_main

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
LCMKIT = Path(sys.executable).with_name("lcmkit")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
ENV.pop("LCMKIT_DEBUG", None)

#: distill flags shared by every training run here: tiny, LoRA, 32 px, no progress bar, CPU
DISTILL = ["--data", "world", "--mode", "lora", "--lora-rank", "4", "--lora-alpha", "8", "--batch-size", "2",
           "--generated-samples", "6", "--resolution", "32", "--lr", "1e-3", "--warmup-steps", "0",
           "--validate-every", "0", "--validation-steps", "1", "--log-every", "1", "--no-progress",
           "--device", "cpu"]


# --------------------------------------------------------------------------------------------------------------
# helpers: the report, the CLI, malicious pickles
# --------------------------------------------------------------------------------------------------------------

def record(kind: str, case: str, ok: bool, **extra) -> None:
    """Append one tried fault to the report file (when LCMKIT_FAULTS_REPORT is set)."""
    path = os.environ.get("LCMKIT_FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "case": case, "ok": bool(ok), **extra}) + "\n")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``lcmkit ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli_main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_lcmkit(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``lcmkit ARGS`` as a real subprocess (the installed console script)."""
    return subprocess.run([str(LCMKIT), *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(code: int, err: str) -> bool:
    """What every fault must look like to a user: non-zero exit, one line on stderr, no traceback."""
    # what a terminal shows: a progress bar redrawn with \r and cleared is not a line of its own
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    return code not in (0, None) and len(lines) == 1 and "Traceback" not in err and "internal error" not in err


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code a downloaded file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_bytes(marker: Path, kind: str) -> bytes:
    """A pickle that would create ``marker``: raw pickle (protocol 2 / 0), torch.save zip, legacy torch.save."""
    obj = {"weight": Payload(marker)}
    if kind == "pickle":
        return pickle.dumps(obj, protocol=2)
    if kind == "pickle-v0":
        return pickle.dumps(obj, protocol=0)
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=(kind == "torch-zip"))
    return buf.getvalue()


PAYLOADS = ("pickle", "pickle-v0", "torch-zip", "torch-legacy")
