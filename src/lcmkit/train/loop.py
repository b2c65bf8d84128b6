"""The training loop every lcmkit recipe shares (distillation, LCF fine-tuning, refinement, style LoRAs).

A recipe builds its models, data and loss; :class:`Run` does the rest, in this order:

1. :meth:`Run.start`: the processes (:func:`~lcmkit.train.runtime.setup_accelerator`) and the run folder, locked for
   the run and refused when it holds results unless ``--resume`` or ``--overwrite`` (which keeps them aside until
   the new run has a checkpoint: :mod:`lcmkit.train.folder`), before any model is loaded;
2. :meth:`Run.record_config`: the resolved config, written into the folder and every checkpoint (a ``--resume``
   first refuses a recipe other than the checkpoint's, and writes nothing until the checkpoint is restored);
3. :meth:`Run.optimise`: AdamW, its schedule, the fp16 scaler and the non-finite guard, and a resume from the last
   checkpoint (refusing one made with other ``must_match`` settings);
4. :meth:`Run.train`: optimizer steps (micro-batches, gradient sync, guard, clipping, AdamW, LR step), then the
   recipe's ``after_step`` (an EMA update), a progress bar, log lines, checkpoints and validation grids when due;
5. :meth:`Run.finish`: a check that every process holds the same weights, the result (written only when the run
   reached ``max_steps``) and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..atomic import write_json
from ..errors import LcmkitError
from .checkpoint import (
    CHECKPOINT_DIR,
    check_loaded,
    check_restored,
    checkpoint_dirs,
    damaged,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from .config import TrainingOptions, resume_changes, save_config
from .folder import (
    acquire_lock,
    check_output_path,
    commit,
    move_aside,
    release,
    restore,
)
from .logs import RunProgress, save_image_grid
from .optim import (
    NonFiniteGuard,
    StepOutcome,
    make_lr_scheduler,
    make_optimizer,
    optimizer_step,
)
from .runtime import (
    check_same_weights,
    data_positions,
    make_grad_scaler,
    setup_accelerator,
)


def prepare_output_dir(out_dir: str | os.PathLike, result_names: Iterable[str], overwrite: bool, resume: bool,
                       command: str = "lcmkit") -> Path:
    """Create ``out_dir`` and lock it for this run (:mod:`lcmkit.train.folder`); refuse one that holds results
    (``result_names`` or checkpoints) unless ``resume`` (they are kept and training continues) or ``overwrite``
    (they are moved aside, and deleted only once the new run has produced a checkpoint or its result)."""
    out = check_output_path(out_dir, "output folder")
    if out.exists() and not out.is_dir():
        raise LcmkitError(f"output {out} exists and is not a folder; choose another --out")
    names = [CHECKPOINT_DIR, *result_names]
    # pre-flight: fail now, in words, rather than at the first checkpoint after hours of training
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-write-check-"):
            pass
    except OSError as e:
        raise LcmkitError(f"output folder {out} cannot be written ({e.strerror or e}); choose another --out or "
                          "fix its permissions") from e
    lock = acquire_lock(out, command)  # first: a folder in use is refused as such, whatever it holds
    try:
        if restore(out, names):  # an --overwrite run was killed before it produced anything
            print(f"{command}: put back the results in {out} that an interrupted --overwrite run had moved aside")
        present = [n for n in names if os.path.lexists(out / n)]
        if present and not (overwrite or resume):
            raise LcmkitError(f"output folder {out} already has results ({', '.join(present)}); pass --resume to "
                              "continue that run, --overwrite to replace it, or choose another --out")
        if overwrite and not resume:
            move_aside(out, names)
    except BaseException:
        lock.release()
        raise
    return out


def open_run_folder(folder: str | os.PathLike, result_names: Iterable[str], cfg: TrainingOptions, accelerator,
                    command: str) -> list[Path]:
    """Prepare the run folder on the main process (:func:`prepare_output_dir`), then return its checkpoints (oldest
    first) on every process. A ``--resume`` that finds none says so (``command``: the CLI's name) and starts at 0."""
    main = accelerator.is_main_process
    if main:
        prepare_output_dir(folder, result_names, cfg.overwrite, cfg.resume, command)
    accelerator.wait_for_everyone()
    checkpoints = checkpoint_dirs(folder)
    if cfg.resume and not checkpoints and main:
        print(f"{command}: no checkpoint in {folder}; starting from step 0")
    return checkpoints


def make_optimisation(params: list[torch.nn.Parameter], cfg: TrainingOptions, device: torch.device):
    """(AdamW, its LR schedule over ``max_steps``, the fp16 GradScaler or None, the non-finite guard) of a run."""
    optimizer = make_optimizer(params, cfg.optim)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, cfg.max_steps)
    return optimizer, lr_scheduler, make_grad_scaler(device, cfg.mixed_precision), NonFiniteGuard(cfg.max_nonfinite)


def resume_run(path: str | os.PathLike, optimizer, lr_scheduler, scaler, guard: NonFiniteGuard,
               must_match: dict[str, Any], load_weights: Callable[[dict, Any], None], stream, rank: int
               ) -> tuple[int, int, dict]:
    """Continue from checkpoint ``path``: the training state (:func:`restore_training_state`, refusing other
    ``must_match`` settings), the weights (``load_weights(weights, path)``, the recipe's) and this process's data
    position in ``stream``. A damaged checkpoint (NaN weights, a part missing, a tensor that does not fit) is refused
    with the "delete it" message. Returns (step, fp16 overflows so far, the checkpoint's weights)."""
    weights, state = load_checkpoint(path)
    check_loaded(path, weights, state)
    step, position = restore_training_state(path, state, optimizer, lr_scheduler, scaler, guard, must_match, rank)
    try:
        load_weights(weights, path)
        stream.restore(*position)
    except LcmkitError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # a part missing, a shape that won't fit
        raise damaged(path, f"its weights do not load into this model: {type(e).__name__}: {e}") from e
    return step, int(state.get("fp16_overflow", 0)), weights


def training_step(micro_loss: Callable[[int, int], torch.Tensor], step: int, cfg: TrainingOptions,
                  params: list[torch.nn.Parameter], optimizer, lr_scheduler, scaler, guard: NonFiniteGuard,
                  accelerator) -> StepOutcome:
    """Optimizer step ``step + 1`` (``step``: the steps done so far) over ``cfg.grad_accum`` micro-batches.

    ``micro_loss(step, micro)`` is the recipe's loss of micro-batch ``micro`` (its data and its draws); each is
    divided by their number and back-propagated (scaled under fp16), then :func:`optimizer_step` takes the step.
    """
    optimizer.zero_grad(set_to_none=True)
    micro_losses = []
    for micro in range(cfg.grad_accum):
        loss = micro_loss(step, micro) / cfg.grad_accum
        (scaler.scale(loss) if scaler is not None else loss).backward()
        micro_losses.append(loss.detach().float())
    return optimizer_step(params, micro_losses, optimizer, lr_scheduler, scaler, guard, accelerator,
                          cfg.optim.max_grad_norm, step + 1)


def save_run_checkpoint(out_dir: str | os.PathLike, step: int, weights: dict[str, dict[str, torch.Tensor]], optimizer,
                        lr_scheduler, scaler, guard: NonFiniteGuard, stream, accelerator,
                        config_writer: Callable[[Path], None], keep: int, **extra) -> None:
    """Checkpoint a run at ``step``: every process contributes its data position (``stream.state()``), the main
    process writes ``weights`` and :func:`training_state` (with ``extra``) atomically; all wait for it."""
    positions = data_positions(stream.state(), accelerator)
    if accelerator.is_main_process:
        state = training_state(step, optimizer, lr_scheduler, scaler, guard, positions, accelerator.num_processes,
                               **extra)
        save_checkpoint(out_dir, step, weights, state, config_writer, keep)
    accelerator.wait_for_everyone()


@dataclass
class Run:
    """One run of a recipe: its config, folder, processes and optimisation state (see the module docstring)."""

    cfg: TrainingOptions
    folder: Path
    command: str                  # the CLI's name, for messages ("lcmkit distill")
    accelerator: Any
    checkpoints: list[Path]       # complete checkpoints found at the start, oldest first
    write_config: Callable[[Path], None] | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: Any = None
    lr_scheduler: Any = None
    scaler: Any = None
    guard: NonFiniteGuard | None = None
    step: int = 0                 # optimizer steps done
    overflow: int = 0             # fp16 steps the scaler skipped
    progress: RunProgress | None = None
    recipe_changes: dict = field(default_factory=dict)  # field → (checkpoint's, this run's), --allow-changed-recipe
    resumed_weights: dict | None = None  # the checkpoint's weights, until the model is checked against them
    produced: bool = False        # a checkpoint or the result is written (what --overwrite waits for)

    @classmethod
    def start(cls, cfg: TrainingOptions, folder: str | os.PathLike, result_names: Iterable[str], command: str) -> Run:
        accelerator = setup_accelerator(cfg.mixed_precision, cpu=cfg.device == "cpu")
        checkpoints = open_run_folder(folder, result_names, cfg, accelerator, command)
        return cls(cfg, Path(folder), command, accelerator, checkpoints)

    # read-only views of the accelerator, one per name the recipes use (boilerplate on purpose)
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def finished(self) -> bool:
        return self.step >= self.cfg.max_steps

    @property
    def resuming(self) -> bool:  # --resume, and a checkpoint to resume from
        return bool(self.cfg.resume and self.checkpoints)

    def _produced(self) -> None:
        """The new run has written something to replace an --overwrite'd run's files with: delete those now."""
        if self.main and not self.produced:
            self.produced = True
            commit(self.folder)

    def record_config(self, resolved: dict) -> None:
        """Write the config with the run's ``resolved`` values into the folder and into every checkpoint.

        A ``--resume`` first compares the recipe with the checkpoint's (:func:`~lcmkit.train.config.resume_changes`:
        refused when it changed, unless ``--allow-changed-recipe``), and writes the config only once the checkpoint
        is restored and checked: a refused resume leaves the folder as it was."""
        self.write_config = lambda folder: save_config(self.cfg, folder, resolved)
        if self.resuming:
            self.recipe_changes = resume_changes(self.cfg, resolved, self.checkpoints[-1])
        elif self.main:
            self.write_config(self.folder)

    def optimise(self, params: list[torch.nn.Parameter], must_match: dict[str, Any],
                 load_weights: Callable[[dict, Any], None], position) -> None:
        """Optimisation state for ``params``; with ``--resume``, continue from the last checkpoint (its weights through
        the recipe's ``load_weights(weights, path)``, its data position into ``position``)."""
        self.params = params
        self.optimizer, self.lr_scheduler, self.scaler, self.guard = make_optimisation(params, self.cfg, self.device)
        if self.resuming:
            self.step, self.overflow, self.resumed_weights = resume_run(
                self.checkpoints[-1], self.optimizer, self.lr_scheduler, self.scaler, self.guard,
                {**must_match, "processes": self.world_size}, load_weights, position, self.rank)

    def _resumed(self, checkpoint_weights: Callable[[], dict]) -> None:
        """After a resume, before the first step: the model holds exactly the checkpoint's weights; then (main
        process) the config is written and an allowed recipe change recorded in ``logs/resumes.jsonl``."""
        weights, self.resumed_weights = self.resumed_weights, None
        if weights is not None:
            check_restored(self.checkpoints[-1], checkpoint_weights(), weights)
        if not (self.resuming and self.main and self.write_config is not None):
            return
        self.write_config(self.folder)
        if self.recipe_changes:
            changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.recipe_changes.items())
            log = self.folder / "logs" / "resumes.jsonl"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": self.step,
                                    "checkpoint": str(self.checkpoints[-1]), "allow_changed_recipe": True,
                                    "changed": {k: list(v) for k, v in self.recipe_changes.items()}},
                                   default=str) + "\n")
            print(f"{self.command}: resuming at step {self.step} with a changed recipe ({changed}); recorded in "
                  f"{log}", file=sys.stderr)

    def train(self, micro_loss: Callable[[int, int], torch.Tensor], *, desc: str,
              checkpoint_weights: Callable[[], dict[str, dict[str, torch.Tensor]]], position,
              checkpoint_extra: dict | None = None, after_step: Callable[[StepOutcome], dict | None] | None = None,
              validate: Callable[[], list[list]] | None = None) -> None:
        """Optimizer steps until ``stop_at`` / ``max_steps``. ``micro_loss(step, micro)``: the recipe's loss of one
        micro-batch; ``after_step(outcome)``: the recipe's update after each step (EMA, when ``outcome.ok``), which
        may return extra values for the log lines; ``validate()``: rows of images for a grid."""
        cfg = self.cfg
        self._resumed(checkpoint_weights)
        progress = self.progress = RunProgress(cfg, self.folder / "logs", desc, self.step, self.main)
        try:
            while self.step < progress.stop:
                t0 = time.perf_counter()
                outcome = training_step(micro_loss, self.step, cfg, self.params, self.optimizer, self.lr_scheduler,
                                        self.scaler, self.guard, self.accelerator)
                extra_log = after_step(outcome) if after_step is not None else None
                self.overflow += int(outcome.fp16_overflow)
                self.step += 1
                progress.record(self.step, outcome, time.perf_counter() - t0, self.guard.skipped, self.overflow)
                if extra_log and progress.log_due(self.step):
                    progress.logger.log(self.step, extra_log)
                if progress.checkpoint_due(self.step):
                    save_run_checkpoint(self.folder, self.step, checkpoint_weights(), self.optimizer,
                                        self.lr_scheduler, self.scaler, self.guard, position, self.accelerator,
                                        self.write_config, cfg.keep_checkpoints, fp16_overflow=self.overflow,
                                        **(checkpoint_extra or {}))
                    self._produced()
                if self.main and validate is not None and progress.validation_due(self.step):
                    save_image_grid(validate(), self.folder / "validation" / f"step-{self.step:07d}.png")
        finally:
            progress.close()

    def finish(self, result: Path, write_result: Callable[[], None], **summary) -> None:
        """Check the processes agree, write the result (main process, finished runs only) with ``write_result()``,
        then ``summary.json``: the loop's counters plus the recipe's ``summary`` fields."""
        sums, consistent = check_same_weights(self.params, self.accelerator)
        if self.main:
            if self.finished:
                write_result()
                self._produced()
            skipped = summary.get("data_skipped") or {}
            if skipped:  # bad data never stops a run below the threshold, but it is always reported
                reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
                print(f"{self.command}: skipped {sum(skipped.values())} unusable samples/shards ({reasons}); see "
                      f"{self.folder / 'summary.json'}", file=sys.stderr)
            write_json(self.folder / "summary.json", {
                "step": self.step, "max_steps": self.cfg.max_steps, "finished": self.finished,
                "nonfinite_skipped": self.guard.skipped, "fp16_overflow": self.overflow,
                "processes": self.world_size, "ranks_consistent": consistent, "weights_checksum": sums[0],
                "sec_per_step": self.progress.sec_per_step() if self.progress else None,
                "losses": self.progress.losses if self.progress else [],
                "result": str(result) if self.finished else None, **summary})
            release(self.folder)
        self.accelerator.wait_for_everyone()
