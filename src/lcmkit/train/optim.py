"""Optimisation: AdamW, the learning-rate schedule, the EMA update, the non-finite guard, and one optimizer step.

:func:`lr_factor` is the one learning-rate schedule of every lcmkit trainer: warm-up, then constant or cosine, a pure function of the *optimizer* step, so it is never stretched by
the number of processes. :func:`ema_update_` is the one EMA. :func:`optimizer_step` is everything between the
micro-batches' backward passes and the next step, taken or skipped identically on every process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import LcmkitError
from .config import OptimConfig
from .runtime import all_reduce_mean, sync_gradients


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    1. linear warm-up: (step + 1) / warmup_steps for step < warmup_steps;
    2. then ``constant``: 1, or ``cosine``: r + (1 − r)·½(1 + cos(π·p)), p = progress through the remaining steps,
       r = ``min_ratio`` (the floor the cosine decays to; 0 for the recipes).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def make_lr_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_factor`; step it once per optimizer step on every process (never ``prepare`` it:
    accelerate's wrapper would step it ``num_processes`` times)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_schedule))


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], mu: float) -> None:
    """θ⁻ ← μ·θ⁻ + (1 − μ)·θ, in place over matching tensors (LCM paper, Algorithm 1, last line). μ = 0 copies θ."""
    for t, o in zip(target, online):
        if mu == 0.0:
            t.copy_(o)
        else:
            t.lerp_(o.to(t.dtype), 1.0 - mu)


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


@dataclass
class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; too many in a row stop the run.

    ``record(ok)`` returns True when the step may proceed; raises :class:`LcmkitError` after ``max_in_a_row``
    consecutive bad steps (0 = never stop).
    """

    max_in_a_row: int = 5
    skipped: int = 0
    in_a_row: int = 0

    def record(self, ok: bool, step: int, what: str = "loss") -> bool:
        if ok:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise LcmkitError(
                f"{self.in_a_row} training steps in a row had a non-finite {what} (last at step {step}; "
                f"{self.skipped} skipped in all); stopping, the last good checkpoint is kept. Likely causes: fp16 "
                "overflow (use --mixed-precision bf16 or no), a learning rate too high (lower --lr, add warm-up), "
                "or bad input data")
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])


@dataclass
class StepOutcome:
    """What :func:`optimizer_step` did, for logs and progress bars."""

    loss: float            # this step's loss: mean over micro-batches (already divided) and processes
    ok: bool               # False: a non-finite loss/gradient, the step was skipped (and counted by the guard)
    grad_norm: float       # before clipping; nan when clipping is off or the step was skipped
    lr: float              # the learning rate this step used
    fp16_overflow: bool    # fp16 gradients overflowed: the scaler skipped the update and lowered its scale


def optimizer_step(params: list[torch.nn.Parameter], micro_losses: list[torch.Tensor], optimizer, lr_scheduler,
                   scaler, guard: NonFiniteGuard, accelerator, max_grad_norm: float, step: int) -> StepOutcome:
    """One optimizer step after the micro-batches' ``backward()`` (losses already divided by their number).

    1. gradients and the loss averaged over processes, so every rank takes the same decisions below;
    2. fp16: unscale the gradients; a non-finite loss (or gradient, without a scaler) skips the step and is counted
       by ``guard`` (which stops the run after too many in a row); under fp16 an overflow in the *gradients* is the
       scaler's business (it skips the update and lowers its scale), not an error;
    3. clipping (``max_grad_norm`` > 0), AdamW (through the scaler under fp16);
    4. scaler update and one LR-schedule step (once per optimizer step, on every process).
    ``step`` is the 1-based number of this step, for the guard's message. EMA updates are the caller's, when ``ok``.
    """
    sync_gradients(params, accelerator)
    loss = all_reduce_mean(torch.stack(micro_losses).sum(), accelerator)
    if scaler is not None:
        scaler.unscale_(optimizer)
    loss_ok = bool(torch.isfinite(loss))
    grads_ok = grads_finite(params)
    ok = guard.record(loss_ok and (grads_ok or scaler is not None), step, "loss" if not loss_ok else "gradient")
    grad_norm = float("nan")
    if ok:
        if max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    return StepOutcome(float(loss), ok, grad_norm, lr, ok and scaler is not None and not grads_ok)
