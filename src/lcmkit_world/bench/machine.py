"""What produced a benchmark result (machine, versions), noise-robust timing, and result files.

Every result file records :func:`machine_info` and the exact command line, so a number can be traced to the
hardware and software that made it. Timings on a shared machine are noisy: methods are interleaved (one run
of each per round, the order rotated every round), repeated, and summarised by their median.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from lcmkit import atomic


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo ("model name"), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (runnable processes; other jobs on the machine show here), or None."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device | None = None) -> dict:
    """CPU, threads, versions, GPU, date and the load average when the bench starts (``load_average``)."""
    import diffusers

    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "gpu": None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": load_average()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    if device is not None:
        info["device"] = str(device)
    return info


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """Half the range of ``values`` relative to their median: a plain noise band for a handful of repeats."""
    if len(values) < 2:
        return 0.0
    return (max(values) - min(values)) / 2 / abs(median(values))


def interleaved(runs: dict[str, Callable[[], dict]], repeats: int, warmup: bool = True) -> dict[str, list[dict]]:
    """Call every run ``repeats`` times, one of each per round, the order rotated each round (so no method
    always runs first, or right after the same neighbour). Each call returns a dict of measurements.

    With ``warmup``, each run is called once first and its result dropped (lazy init, allocator, caches).
    """
    names = list(runs)
    if warmup:
        for name in names:
            runs[name]()
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(runs[name]())
    return results


def timed(fn: Callable[[], object], device=None) -> tuple[object, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def write_outputs(out_dir: Path, name: str, result: dict, markdown: Callable[[dict], str],
                  plot: Callable[[dict, Path], None]) -> None:
    """A benchmark's three outputs side by side: ``name``.json, ``name``.md and ``name``.png in ``out_dir``."""
    write_json(out_dir / f"{name}.json", result)
    atomic.write_text(out_dir / f"{name}.md", markdown(result))
    plot(result, out_dir / f"{name}.png")


def write_json(path: Path, data: dict) -> Path:
    """A benchmark's JSON (numpy values as numbers), atomically."""
    return atomic.write_json(path, data, indent=2, default=_jsonable)


def _jsonable(value):
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_header(title: str, info: dict, command: str) -> str:
    gpu = info.get("gpu") or "none"
    load = ""
    if info.get("load_average"):
        load = f" Load average (1/5/15 min) at the start {info['load_average']}"
        if info.get("load_average_end"):
            load += f", at the end {info['load_average_end']}"
        load += "."
    return (f"# {title}\n\n`{command}`\n\n"
            f"Machine: {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), GPU: {gpu}; "
            f"torch {info['torch']}, diffusers {info['diffusers']}; {info['date']}.{load}\n\n")


def table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}"
    return str(v)
