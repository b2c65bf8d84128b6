"""Encoding a recipe's batches: images → latents (the VAE posterior mean) and captions → text conditioning, with
the optional caches that encode every sample or caption once up front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..denoisers import TextConditioning
from ..errors import LcmkitError

if TYPE_CHECKING:
    from .data import DataSource, DataStream, Sample


CACHE_CHUNK = 32  # caches are filled in fixed chunks of index order, so their contents never depend on batching
#: flow architectures (:data:`lcmkit.flow_pipelines.FLOW_ARCHS`): their conditioning is text tokens + a pooled vector
FLOW_ARCHS = ("sd3", "flux")
#: architectures whose unconditional branch is the empty prompt encoded (SDXL's: all-zero embeddings)
EMPTY_PROMPT_UNCOND = ("sd", *FLOW_ARCHS)


@torch.no_grad()
def encode_pixels(pipe, pixels: Tensor) -> Tensor:
    """z = scaling_factor · mean of the VAE posterior (B, C, H/f, W/f), float32; SD3's VAE: scaling_factor ·
    (mean − shift_factor), as its pipelines encode."""
    vae = pipe.vae
    mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    return ((mean if shift is None else mean - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def encode_text(pipe, arch: str, captions: list[str]) -> tuple[Tensor, Tensor | None]:
    """(hidden states (B, L, D), pooled (B, P) or None) in the text encoders' dtype (flow transformers: their
    architecture's conditioning, :class:`lcmkit.flow_pipelines.FlowArch`: SD3's joint CLIP ‖ T5 tokens and both
    CLIPs' pooled outputs, FLUX's T5 tokens and CLIP-L's pooled output)."""
    from ..pipelines import encode_prompt_sd, encode_prompt_sdxl

    if arch == "sdxl":
        c = encode_prompt_sdxl(pipe, captions, 0, 0)
        return c.encoder_hidden_states, c.text_embeds
    if arch in FLOW_ARCHS:
        from ..flow_pipelines import FLOW_ARCHS as FLOW

        c, _ = FLOW[arch].conditioning(pipe, captions)
        return c.encoder_hidden_states, c.pooled_projections
    return encode_prompt_sd(pipe, captions).encoder_hidden_states, None


def build_latent_cache(source: DataSource, stream: DataStream, pipe, progress: bool) -> dict:
    """Encode every sample once (centre crop, no flip): index → {latent, caption, time_ids}; None if unusable."""
    from tqdm.auto import tqdm

    cache: dict[int, dict | None] = {}
    indices = list(range(len(source)))
    for start in tqdm(range(0, len(indices), CACHE_CHUNK), desc="caching latents", disable=not progress,
                      leave=False):
        samples = [stream.load(i, 0) for i in indices[start:start + CACHE_CHUNK]]
        good = [s for s in samples if s is not None]
        if good:
            latents = encode_pixels(pipe, torch.stack([s.pixels for s in good])).cpu()
            for s, z in zip(good, latents):
                cache[s.index] = {"latent": z, "caption": s.caption, "time_ids": s.time_ids}
        for s, i in zip(samples, indices[start:start + CACHE_CHUNK]):
            if s is None:
                cache[i] = None
    if not any(v is not None for v in cache.values()):
        raise LcmkitError(f"no usable sample in {source.cfg.data}")
    return cache


def build_text_cache(captions: list[str], pipe, arch: str) -> dict[str, tuple[Tensor, Tensor | None]]:
    cache = {}
    for start in range(0, len(captions), CACHE_CHUNK):
        chunk = captions[start:start + CACHE_CHUNK]
        hidden, pooled = encode_text(pipe, arch, chunk)
        for j, caption in enumerate(chunk):
            cache[caption] = (hidden[j], None if pooled is None else pooled[j])
    return cache


@dataclass
class Encoder:
    """Batch of samples → (z0, cond, uncond), using the caches where they exist (flow transformers:
    ``FlowConditioning``)."""

    pipe: object
    arch: str
    device: torch.device
    uncond_hidden: Tensor | None = None   # SD, SD3, FLUX: the embedding of "" (1, L, D)
    text_cache: dict | None = None
    latent_cache: dict | None = None
    uncond_pooled: Tensor | None = None   # SD3, FLUX: the pooled embedding of "" (1, P)

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> tuple[Tensor, TextConditioning, TextConditioning]:
        if self.latent_cache is not None:
            z0 = torch.stack([self.latent_cache[s.index]["latent"] for s in samples]).to(self.device)
        else:
            z0 = encode_pixels(self.pipe, torch.stack([s.pixels for s in samples]))
        captions = [s.caption for s in samples]
        if self.text_cache is not None and all(c in self.text_cache for c in captions):
            hidden = torch.stack([self.text_cache[c][0] for c in captions])
            pooled = torch.stack([self.text_cache[c][1] for c in captions]) if self.arch != "sd" else None
        else:
            hidden, pooled = encode_text(self.pipe, self.arch, captions)
        if self.arch in FLOW_ARCHS:
            from ..flow_denoisers import FlowConditioning

            # the flow pipelines' unconditional branch: the empty prompt, encoded
            return z0, FlowConditioning(hidden, pooled), FlowConditioning(self.uncond_hidden.expand_as(hidden),
                                                                          self.uncond_pooled.expand_as(pooled))
        if self.arch == "sdxl":
            time_ids = torch.tensor([s.time_ids for s in samples], dtype=hidden.dtype, device=hidden.device)
            cond = TextConditioning(hidden, pooled, time_ids)
            # the SDXL LCM scripts' unconditional branch: all-zero embeddings, same time ids
            uncond = TextConditioning(torch.zeros_like(hidden), torch.zeros_like(pooled), time_ids)
        else:
            cond = TextConditioning(hidden)
            uncond = TextConditioning(self.uncond_hidden.expand_as(hidden))
        return z0, cond, uncond
