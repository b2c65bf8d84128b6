"""Flow-matching pipelines in lcmkit: SD3 / SD3.5 (``StableDiffusion3Pipeline``) and FLUX.1 (``FluxPipeline``):
recognising them, what differs between them (:class:`FlowArch`), and sampling them for ``generate`` (text-to-image
and image-to-image; samplers ``lcm``, ``euler``, ``heun``).

Conventions (docs/flow-matching.md, "Generating"):

- **guidance** is diffusers' ``guidance_scale`` g. A guidance-distilled FLUX transformer (FLUX.1-dev,
  ``guidance_embeds``) takes g through its guidance embedding: one forward, default 3.5 as ``FluxPipeline``, and no
  negative prompt (there is no unconditional pass for it to act in). Otherwise (SD3; FLUX without the embedding)
  g > 1 runs CFG on the velocity in one batched forward [negative; prompt], the negative prompt "" unless given (as
  the SD3 pipeline encodes it; ``FluxPipeline``'s ``true_cfg_scale``); g ≤ 1 runs the conditional model alone and
  refuses a negative prompt.
- **sigmas**: the table the pipeline sets on its scheduler for ``steps`` (SD3: ``set_timesteps`` with its shift or
  dynamic shift; FLUX: linspace(1, 1/N, N) shifted by μ of the image's token count), for every sampler, so the
  ``lcm`` sampler walks the table ``FlowMatchLCMScheduler`` walks.
- **randomness**: image i uses its own generator (seed S + i): its initial latent, its VAE posterior sample and
  the LCM sampler's per-step ε, in that order. diffusers' SD3 and FLUX pipelines draw the latent (and the posterior
  sample and noise of img2img) from their ``generator`` too, so the ``euler`` / ``heun`` images and one-step
  ``lcm`` images equal theirs for the same seed; their ``FlowMatchLCMScheduler`` draws the per-step ε from torch's
  global RNG, which :func:`sample_sd3` / :func:`lcmkit.flux.sample_flux` can reproduce
  (``noise_generator=torch.default_generator``). FLUX: the latent is drawn unpacked (B, 16, h, w), then packed, and
  the sampler runs on the packed tokens, so each ε is drawn in ``FluxPipeline``'s layout.
- **img2img strength**: the ``steps``-step table truncated to its last int(steps·strength) steps; the image's
  latent is noised to the first kept σ (eq. F1). This is lcmkit's UNet teacher convention; diffusers'
  ``StableDiffusion3Img2ImgPipeline`` and ``FluxImg2ImgPipeline`` keep steps − int(steps − steps·strength) steps,
  the same count whenever steps·strength is a whole number.
- **sizes**: multiples of the VAE scale factor × 2 (SD3's patch size, FLUX's 2×2 packing); by default SD3's
  transformer ``sample_size`` × the VAE factor, FLUX's ``default_sample_size`` × the VAE factor (1024 px).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .errors import LcmkitError
from .flow_denoisers import (
    FlowConditioning,
    scheduler_sigmas,
    scheduler_training_grid,
    sd3_conditioning,
    sd3_denoiser,
)
from .flow_solvers import FLOW_SAMPLERS, get_flow_sampler
from .flux import (
    DEFAULT_FLUX_GUIDANCE,
    FLUX_DEFAULT_MAX_SHIFT,
    flux_conditioning,
    flux_denoiser,
    flux_scheduler_sigmas,
    pack_latents,
    packed_denoiser,
    unpack_latents,
)
from .math.flow import flow_noise
from .pipelines import check_negative_prompt, decode_latents, encode_image, to_pil, vae_scale_factor
from .solvers import Generators, randn


@dataclass(frozen=True)
class FlowArch:
    """What differs between the flow transformers lcmkit drives; the samplers, the flow LCD loss and the recipe are
    shared. Each callable takes the pipeline (or the transformer, or its config):

    - ``conditioning(pipe, prompts, negative_prompt=None, guided=False) -> (cond, uncond | None)``;
    - ``denoiser(transformer, cond, *, uncond=None, omega=None, guidance=None, num_train_timesteps)`` →
      ``denoiser(x_σ, σ) -> (x̂0, v̂)`` (``guidance``: the embedded g, only where ``embeds_guidance``);
    - ``sigmas(pipe, steps, latent_hw)``: the sampling table σ_0 > … > σ_N = 0 the pipeline sets;
    - ``grid(pipe, skip, latent_hw)``: the distillation grid σ_0 = 0 < … < σ_N on the same shifted table;
    - ``latent_channels(config)``, ``latent_multiple(config)``: the VAE latent's channels, and what its sides must
      be multiples of (the patch size);
    - ``default_size(pipe)``: the native image side in pixels;
    - ``embeds_guidance(transformer)``: g goes through a guidance embedding (FLUX.1-dev), not CFG;
    - ``packed``: the samplers run on 2×2-packed tokens (FLUX), so each step's ε has the pipeline's layout.
    """

    name: str
    conditioning: Callable
    denoiser: Callable
    sigmas: Callable
    grid: Callable
    latent_channels: Callable
    latent_multiple: Callable
    default_size: Callable
    embeds_guidance: Callable
    packed: bool


SD3 = FlowArch(
    "sd3", sd3_conditioning, sd3_denoiser,
    sigmas=lambda pipe, steps, hw: scheduler_sigmas(pipe.scheduler.config, steps, hw,
                                                    pipe.transformer.config.patch_size),
    grid=lambda pipe, skip, hw: scheduler_training_grid(pipe.scheduler.config, skip, hw,
                                                        pipe.transformer.config.patch_size),
    latent_channels=lambda config: config.in_channels, latent_multiple=lambda config: config.patch_size,
    default_size=lambda pipe: pipe.transformer.config.sample_size * vae_scale_factor(pipe),
    embeds_guidance=lambda transformer: False, packed=False)

FLUX = FlowArch(
    "flux", flux_conditioning, flux_denoiser,
    sigmas=lambda pipe, steps, hw: flux_scheduler_sigmas(pipe.scheduler.config, steps, hw),
    grid=lambda pipe, skip, hw: scheduler_training_grid(pipe.scheduler.config, skip, hw, 2, FLUX_DEFAULT_MAX_SHIFT),
    latent_channels=lambda config: config.in_channels // 4, latent_multiple=lambda config: 2,  # 2×2 packing
    default_size=lambda pipe: pipe.default_sample_size * vae_scale_factor(pipe),
    embeds_guidance=lambda transformer: bool(transformer.config.guidance_embeds), packed=True)

#: transformer class → the flow architecture lcmkit drives
FLOW_FAMILIES: dict[str, FlowArch] = {"SD3Transformer2DModel": SD3, "FluxTransformer2DModel": FLUX}
#: architecture name ("sd3", "flux") → its :class:`FlowArch`
FLOW_ARCHS: dict[str, FlowArch] = {a.name: a for a in FLOW_FAMILIES.values()}


def flow_family(pipe) -> str | None:
    """``"sd3"`` / ``"flux"`` for a pipeline whose denoiser is a supported flow transformer, None for a UNet
    pipeline."""
    if getattr(pipe, "unet", None) is not None:
        return None
    arch = FLOW_FAMILIES.get(type(getattr(pipe, "transformer", None)).__name__)
    return None if arch is None else arch.name


def flow_arch(pipe) -> FlowArch:
    """The :class:`FlowArch` of a flow pipeline (:func:`flow_family` must not be None)."""
    return FLOW_ARCHS[flow_family(pipe)]


def default_guidance(pipe) -> float:
    """The guidance g ``generate`` uses when none is given: ``FluxPipeline``'s embedded 3.5 for a guidance-distilled
    FLUX transformer, else 1 (no CFG)."""
    family = flow_family(pipe)
    embedded = family is not None and FLOW_ARCHS[family].embeds_guidance(pipe.transformer)
    return DEFAULT_FLUX_GUIDANCE if embedded else 1.0


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    """(C, H/f, W/f): the VAE latent of an image of ``height`` × ``width`` pixels (f the VAE scale factor)."""
    f = vae_scale_factor(pipe)
    return flow_arch(pipe).latent_channels(pipe.transformer.config), height // f, width // f


def _model_index(path) -> dict:
    """A pipeline folder's ``model_index.json`` as a dict; {} when there is none or it does not parse (diffusers'
    loader then says what is wrong)."""
    index = Path(path).expanduser() / "model_index.json"
    try:
        data = json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_flow_family(path) -> str | None:
    """The flow family of a pipeline folder from its ``model_index.json`` (its transformer's class), read without
    loading anything; None for anything else (a UNet folder, a single file). A transformer lcmkit does not drive
    is refused here, in one line."""
    entry = _model_index(path).get("transformer")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if name is None:
        return None
    if name not in FLOW_FAMILIES:
        raise LcmkitError(f"{path} is a {name} pipeline; lcmkit drives SD3 / SD3.5 and FLUX.1 transformers "
                          f"({', '.join(FLOW_FAMILIES)}) and UNet pipelines, not this one yet")
    return FLOW_FAMILIES[name].name


def absent_components(path) -> dict[str, None]:
    """The components a flow pipeline folder was saved without (``[null, null]``: T5 and its tokenizer when SD3
    runs without them), to pass as None: diffusers refuses to load an SD3 folder that lacks one otherwise."""
    if folder_flow_family(path) is None:
        return {}
    return {name: None for name, entry in _model_index(path).items() if entry == [None, None]}


def check_flow_pipeline(pipe, name: str) -> None:
    """Refuse a flow pipeline lcmkit cannot drive: it needs the transformer, a VAE, the scheduler and its text
    encoders: SD3 at least one CLIP (T5 may be absent), FLUX both CLIP (its pooled vector) and T5 (its tokens)."""
    missing = [c for c in ("vae", "scheduler") if getattr(pipe, c, None) is None]
    encoders = [getattr(pipe, c, None) for c in ("text_encoder", "text_encoder_2")]
    if flow_family(pipe) == "flux":
        missing += [c for c, e in zip(("text_encoder", "text_encoder_2"), encoders) if e is None]
    elif all(e is None for e in encoders):
        missing.append("text_encoder")
    if missing:
        raise LcmkitError(f"{name} ({type(pipe).__name__}) lacks {', '.join(missing)}; lcmkit samples complete "
                          "SD3 pipelines (T5 may be absent) and complete FLUX pipelines")


class FlowSampling:
    """One ``generate`` call on a flow pipeline (SD3, FLUX): the sigma table, the prompt encoding, then images batch
    by batch (the interface :func:`lcmkit.pipelines.generate_batches` drives for every family). ``eta`` (TCD's γ)
    has no flow sampler to go to and is not read."""

    def __init__(self, pipe, *, sampler: str, steps: int, guidance: float, negative_prompt: str | None,
                 strength: float, init_image, height: int, width: int, device, eta: float = 0.0):
        if sampler not in FLOW_SAMPLERS:
            raise LcmkitError(f"sampler {sampler} is for UNet models; a flow-matching model (SD3, FLUX) samples with "
                              f"{', '.join(FLOW_SAMPLERS)}")
        self.pipe, self.sampler, self.device, self.arch = pipe, sampler, device, flow_arch(pipe)
        self.negative_prompt, self.init_image = negative_prompt, init_image
        if self.arch.embeds_guidance(pipe.transformer):  # FLUX.1-dev: g into the embedding, one forward
            if negative_prompt is not None:
                raise LcmkitError(f"this {type(pipe.transformer).__name__} is guidance-distilled: guidance "
                                  f"{guidance:g} goes into its guidance embedding (one forward, no unconditional "
                                  "pass), so a negative prompt has nothing to act on; drop it")
            self.guidance, self.use_cfg, self.omega = guidance, False, None
        else:  # CFG on v: ω = g − 1
            self.guidance, self.use_cfg = None, guidance > 1.0
            check_negative_prompt(negative_prompt, self.use_cfg, guidance)
            self.omega = guidance - 1.0 if self.use_cfg else None
        self.latent_shape = latent_shape(pipe, height, width)
        self.height, self.width = height, width
        sigmas = self.arch.sigmas(pipe, steps, self.latent_shape[1:])
        kept = steps if init_image is None else min(int(steps * strength), steps)
        if kept < 1:
            raise LcmkitError(f"strength {strength} leaves no step out of {steps}; raise strength or steps")
        self.sigmas = sigmas[steps - kept:].to(device)  # img2img: the last `kept` steps, down to σ = 0
        self.num_steps = kept
        self.cond1 = self.uncond1 = None

    def batch_that_fits(self, wanted: int) -> int:
        """All of them: lcmkit has no memory model of the transformers yet (an allocation that fails is one line)."""
        return wanted

    def encode_first(self, prompts: list[str]) -> None:
        """The conditioning of one prompt, repeated for every batch of a single-prompt call."""
        self.cond1, self.uncond1 = self.arch.conditioning(self.pipe, prompts, self.negative_prompt, self.use_cfg)

    def __call__(self, prompt: str | list[str], seeds: list[int], step_done) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] for ``seeds`` (one generator each), decoded by the VAE."""
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        if isinstance(prompt, str):
            cond = self.cond1.repeat(len(seeds))
            uncond = None if self.uncond1 is None else self.uncond1.repeat(len(seeds))
        else:
            cond, uncond = self.arch.conditioning(self.pipe, prompt, self.negative_prompt, self.use_cfg)
        latents = sample_flow_latents(self.pipe, cond, uncond, self.omega, self.sampler, self.sigmas, generators,
                                      self.latent_shape, guidance=self.guidance, init_image=self.init_image,
                                      size=(self.height, self.width), callback=step_done)
        return decode_latents(self.pipe, latents)


def sample_flow_latents(pipe, cond: FlowConditioning, uncond: FlowConditioning | None, omega: float | None,
                        sampler: str, sigmas: Tensor, generator: Generators, latent_shape: tuple[int, int, int], *,
                        guidance: float | Tensor | None = None, noise_generator: Generators = None, init_image=None,
                        size: tuple[int, int] | None = None, callback=None, transformer=None) -> Tensor:
    """x0 latents (B, C, h, w) of a flow sampler over ``sigmas`` (σ_0 > … > 0), in the conditioning's dtype, with
    ``transformer`` (default the pipeline's; distillation passes its target θ⁻). ``omega`` with ``uncond``: CFG on
    v; ``guidance``: the embedded g of a guidance-distilled FLUX transformer.

    Draws from ``generator`` (one, or one per image) in diffusers' order: text-to-image the initial latent
    x_{σ_0} ~ N(0, I); image-to-image the VAE posterior sample of ``init_image`` (at ``size`` pixels), then ε, and
    x_{σ_0} = (1 − σ_0)·z0 + σ_0·ε (eq. F1). The LCM sampler's per-step ε come from ``noise_generator`` (default
    ``generator``); on FLUX in the packed token layout.
    """
    arch = flow_arch(pipe)
    device, dtype = sigmas.device, cond.encoder_hidden_states.dtype
    shape = (len(cond), *latent_shape)
    if init_image is None:
        x = randn(shape, generator, device, dtype)
    else:
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * len(cond)
        z0 = encode_image(pipe, init_image, gens, *size).to(dtype)
        x = flow_noise(z0, randn(shape, generator, device, dtype), sigmas[0])
    denoiser = arch.denoiser(pipe.transformer if transformer is None else transformer, cond, uncond=uncond,
                             omega=omega, guidance=guidance,
                             num_train_timesteps=pipe.scheduler.config.get("num_train_timesteps", 1000))
    hw = tuple(latent_shape[1:])
    if arch.packed:  # FLUX: sample the packed tokens, as FluxPipeline does
        denoiser, x = packed_denoiser(denoiser, hw), pack_latents(x)
    latents = get_flow_sampler(sampler)(denoiser, x, sigmas,
                                        generator if noise_generator is None else noise_generator, callback=callback)
    return (unpack_latents(latents, hw) if arch.packed else latents).to(dtype)


@torch.no_grad()
def sample_sd3(pipe, prompt: str | list[str], *, steps: int = 4, guidance_scale: float = 1.0,
               negative_prompt: str | list[str] | None = None, sampler: str = "lcm",
               generator: Generators = None, noise_generator: Generators = None, height: int | None = None,
               width: int | None = None, output_type: str = "pil"):
    """Text-to-image on a ``StableDiffusion3Pipeline`` (T5 may be absent) with an lcmkit flow sampler: PIL images,
    a (B, 3, H, W) tensor in [0, 1] (``"pt"``) or the latents (``"latent"``).

    The initial latent is drawn from ``generator`` as diffusers' ``prepare_latents`` draws it; the LCM sampler's
    per-step ε from ``noise_generator`` (default: ``generator``, so image i depends only on its own generator).
    diffusers' SD3 and FLUX pipelines do not pass their generator to ``scheduler.step``, so
    ``FlowMatchLCMScheduler`` draws that ε from torch's global RNG: ``noise_generator=torch.default_generator``
    after ``torch.manual_seed(s)`` reproduces their image for the same seeds; ``"euler"`` draws nothing after the
    latent and reproduces ``FlowMatchEulerDiscreteScheduler``'s image from ``generator`` alone. ``guidance_scale``
    is diffusers' g; g > 1 runs CFG on v.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    guided = guidance_scale > 1
    cond, uncond = sd3_conditioning(pipe, prompts, negative_prompt, guided)
    shape = latent_shape(pipe, height or SD3.default_size(pipe), width or SD3.default_size(pipe))
    sigmas = SD3.sigmas(pipe, steps, shape[1:])
    latents = sample_flow_latents(pipe, cond, uncond, guidance_scale - 1 if guided else None, sampler,
                                  sigmas.to(pipe.transformer.device), generator, shape,
                                  noise_generator=noise_generator)
    if output_type == "latent":
        return latents
    images = decode_latents(pipe, latents)
    return images if output_type == "pt" else to_pil(images)
