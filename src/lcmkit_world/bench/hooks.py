"""Counting and timing module forwards with forward hooks (no change to the code being measured).

A :class:`ForwardMeter` on a UNet counts its calls, the samples it saw (a batched CFG forward over [uncond; cond]
of one image is 1 call and 2 *evaluations*) and the seconds spent inside ``forward``. The same meter on the text
encoder and the VAE decoder splits an end-to-end time into text encoding, UNet, decoding and everything else
(the sampler's own arithmetic, scheduler bookkeeping, LoRA loading: the overhead lcmkit tries to keep small).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from lcmkit_world.bench.machine import synchronize


class ForwardMeter:
    """Forward hooks on ``modules``: ``calls``, ``samples`` (sum of the first input's batch size), ``seconds``.

    Nested calls (a meter on a module and its child) are counted once, at the outer call. ``sync=True``
    synchronises CUDA around each forward so the seconds are the module's own.
    """

    def __init__(self, *modules: torch.nn.Module, sync: bool = False):
        self.modules = [m for m in modules if m is not None]
        self.sync = sync
        self.calls = 0
        self.samples = 0
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0
        self._handles = []

    def _pre(self, module, args, kwargs):
        if self._depth == 0:
            if self.sync:
                synchronize("cuda")
            self._start = time.perf_counter()
            x = args[0] if args else next(iter(kwargs.values()), None)
            self.calls += 1
            self.samples += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else 1
        self._depth += 1

    def _post(self, module, args, kwargs, output):
        self._depth -= 1
        if self._depth == 0:
            if self.sync:
                synchronize("cuda")
            self.seconds += time.perf_counter() - self._start

    def reset(self) -> None:
        self.calls, self.samples, self.seconds = 0, 0, 0.0

    def attach(self) -> "ForwardMeter":
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ForwardMeter":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def vae_decoder_modules(vae) -> list[torch.nn.Module]:
    """The modules ``vae.decode`` runs (``post_quant_conv`` when there is one, and the decoder)."""
    return [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None]


def text_encoder_modules(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]


@contextmanager
def pipeline_meters(pipe, sync: bool = False):
    """Meters on ``pipe``'s UNet, text encoder(s) and VAE decoder, for one ``with`` block."""
    meters = {"unet": ForwardMeter(pipe.unet, sync=sync), "text": ForwardMeter(*text_encoder_modules(pipe), sync=sync),
              "vae": ForwardMeter(*vae_decoder_modules(pipe.vae), sync=sync)}
    for m in meters.values():
        m.attach()
    try:
        yield meters
    finally:
        for m in meters.values():
            m.detach()


def count_unet_evaluations(pipe, run, images: int = 1) -> dict:
    """Run ``run()`` once with a meter on ``pipe.unet``: UNet calls and evaluations per image."""
    with ForwardMeter(pipe.unet) as meter:
        run()
    return {"unet_calls": meter.calls, "unet_evaluations": meter.samples / images}
