"""Processes and precision: one or many processes (``accelerate launch``, ``torchrun``; gloo on CPU), the weight
dtype of frozen models, autocast, the fp16 GradScaler, and the collectives data parallelism needs (gradient and loss
means, data positions, weight checksums)."""

from __future__ import annotations

import os
from typing import Iterable

import torch

from ..errors import LcmkitError

MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def setup_accelerator(mixed_precision: str = "no", cpu: bool = False):
    """An ``accelerate.Accelerator`` for process setup only (device, rank, world size, collectives).

    Works under ``accelerate launch`` and ``torchrun`` (gloo on CPU, nccl on GPU). Mixed precision is applied by
    the recipe itself (:func:`autocast`), so frozen models run in the weight dtype outside autocast.
    """
    from accelerate import Accelerator

    # accelerate only sets up a multi-process CPU group (gloo) when told it runs on CPU
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu or (multi_process and not torch.cuda.is_available()))


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen models (teacher, VAE, text encoders): fp16/bf16 under mixed precision, else float32."""
    return MIXED_PRECISION[mixed_precision]


def autocast(device: torch.device, mixed_precision: str):
    """Autocast context for the trainable model's forward; a no-op context for ``"no"``."""
    return torch.autocast(device_type=device.type, dtype=MIXED_PRECISION[mixed_precision],
                          enabled=mixed_precision != "no")


def make_grad_scaler(device: torch.device, mixed_precision: str):
    """A GradScaler for fp16 (starting at 2¹⁰, not 2¹⁶, so the first steps rarely overflow), else None."""
    if mixed_precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=2.0**10)


def sync_gradients(params: Iterable[torch.nn.Parameter], accelerator) -> None:
    """Average gradients over processes (data parallel), in place.

    Done by hand instead of wrapping the model in DDP: in LCM-LoRA one UNet serves as teacher (adapters off),
    student and target, and DDP's forward hooks (and accelerate's autocast patching of ``forward``) would apply
    to all three. One all-reduce per optimizer step, after the last micro-batch, as DDP's ``no_sync`` does.
    """
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(value: torch.Tensor, accelerator) -> torch.Tensor:
    """Mean of a tensor over processes (a NaN anywhere makes it NaN everywhere: all ranks skip together)."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value / accelerator.num_processes


def weights_checksums(params: Iterable[torch.nn.Parameter], accelerator) -> list[float]:
    """Σ of every trainable weight (float64), one per process: equal on all ranks when data parallelism held."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    return accelerator.gather(checksum).cpu().tolist() if accelerator.num_processes > 1 else [float(checksum)]


def data_positions(position: tuple[int, int], accelerator) -> torch.Tensor:
    """Every process's data-stream position (epoch, position in its share), gathered: (W, 2) int64 on CPU."""
    mine = torch.tensor([*position], dtype=torch.int64, device=accelerator.device)
    if accelerator.num_processes == 1:
        return mine.cpu().view(1, 2)
    return accelerator.gather(mine).cpu().view(-1, 2)


def check_same_weights(params: Iterable[torch.nn.Parameter], accelerator) -> tuple[list[float], bool]:
    """Every process's weight checksum (:func:`weights_checksums`) and whether they all agree; the main process
    refuses to write the result of processes that ended with different weights."""
    sums = weights_checksums(params, accelerator)
    consistent = all(s == sums[0] for s in sums)
    if accelerator.is_main_process and not consistent:
        raise LcmkitError(f"processes ended with different weights (checksums {sums}); please report this")
    return sums, consistent
