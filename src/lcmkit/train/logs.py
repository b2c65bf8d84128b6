"""Run logs: scalars to TensorBoard and ``log.jsonl``, the loss curve as PNG, validation grids, and the progress of
a run (bar, log lines, when checkpoints and grids are due)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_write

if TYPE_CHECKING:
    from .config import TrainingOptions
    from .optim import StepOutcome


class RunLogger:
    """Scalars to TensorBoard (when ``tensorboard`` is installed) and to ``log.jsonl``; main process only."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        except ImportError:  # tensorboard is optional (the dev extra)
            self.writer = None
        self.file = open(log_dir / "log.jsonl", "a")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
            plot_log(Path(self.file.name), Path(self.file.name).with_name(LOSS_PLOT))


LOSS_PLOT = "loss.png"


def plot_log(log_file: str | os.PathLike, path: str | os.PathLike, smooth: int = 20) -> Path | None:
    """The loss curve of a run's ``log.jsonl`` (raw and a running mean of ``smooth`` points; the LR on a second
    axis) as a PNG. A step logged twice (a run killed after logging it, then resumed) counts once: the last entry.
    Returns None when the log has no loss yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries: dict[int, dict] = {}
    for line in Path(log_file).read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if "loss" in e:
            entries[int(e["step"])] = e
    if not entries:
        return None
    steps = sorted(entries)
    loss = np.array([entries[s]["loss"] for s in steps], dtype=np.float64)
    k = max(1, min(smooth, len(loss)))
    mean = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss (logged)")
    ax.plot(steps[k - 1:], mean, lw=1.5, label=f"running mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if all("lr" in entries[s] for s in steps):
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [entries[s]["lr"] for s in steps], c="gray", ls=":", lw=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_image_grid(rows: list[list], path: str | os.PathLike) -> Path:
    """PIL images, one list per row (same length), pasted into one PNG (written atomically)."""
    from ..pipelines import save_grid

    return atomic_write(path, lambda tmp: save_grid([im for row in rows for im in row], tmp, cols=len(rows[0])))


class RunProgress:
    """The bookkeeping of a recipe's loop: the step it stops at (``stop_at``, else ``max_steps``), the progress bar,
    the log lines (every ``log_every`` steps and at the stop), each step's loss and duration for the summary, and
    when a checkpoint or a validation grid is due. The bar and the log are the main process's only."""

    def __init__(self, cfg: TrainingOptions, log_dir: str | os.PathLike, desc: str, step: int, main: bool):
        from tqdm.auto import tqdm

        self.cfg = cfg
        self.logger = RunLogger(log_dir, enabled=main)
        self.stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
        self.bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, disable=not (cfg.progress and main),
                        dynamic_ncols=True)
        self.losses: list[float] = []
        self.step_times: list[float] = []

    def record(self, step: int, outcome: StepOutcome, seconds: float, skipped: int, overflow: int) -> None:
        """Optimizer step ``step`` (1-based) is done: keep its loss and time, move the bar, log when due."""
        self.step_times.append(seconds)
        self.losses.append(outcome.loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{outcome.loss:.4g}", lr=f"{outcome.lr:.2g}")
        if self.log_due(step):
            self.logger.log(step, {"loss": outcome.loss, "lr": outcome.lr, "grad_norm": outcome.grad_norm,
                                   "nonfinite_skipped": skipped, "fp16_overflow": overflow, "sec_per_step": seconds})

    def log_due(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.stop

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.stop

    def validation_due(self, step: int) -> bool:
        return step == self.stop or bool(self.cfg.validate_every and step % self.cfg.validate_every == 0)

    def sec_per_step(self) -> float | None:
        """Median seconds per step of this run (None before any step), for the summary."""
        return float(np.median(self.step_times)) if self.step_times else None

    def close(self) -> None:
        self.bar.close()
        self.logger.close()
