"""Flow-matching pipelines (SD3 / SD3.5, ``StableDiffusion3Pipeline``) in lcmkit: recognising them, and sampling
them for ``generate`` (text-to-image and image-to-image; samplers ``lcm``, ``euler``, ``heun``).

Conventions (docs/flow-matching.md, "Generating"):

- **guidance** is diffusers' ``guidance_scale`` g; g > 1 runs CFG on the velocity in one batched forward
  [negative; prompt], the negative prompt "" unless given (as the SD3 pipeline encodes it); g ≤ 1 runs the
  conditional model alone and refuses a negative prompt.
- **sigmas**: the scheduler's own table for ``steps`` (``FlowMatchEulerDiscreteScheduler.set_timesteps``, its shift
  or dynamic shift), for every sampler, so the ``lcm`` sampler walks the table ``FlowMatchLCMScheduler`` walks.
- **randomness**: image i uses its own generator (seed S + i): its initial latent, its VAE posterior sample and
  the LCM sampler's per-step ε, in that order. diffusers' SD3 pipelines draw the latent (and the posterior sample
  and noise of img2img) from their ``generator`` too, so the ``euler`` / ``heun`` images and one-step ``lcm`` images
  equal theirs for the same seed; their ``FlowMatchLCMScheduler`` draws the per-step ε from torch's global RNG,
  which :func:`sample_sd3` can reproduce (``noise_generator=torch.default_generator``).
- **img2img strength**: the ``steps``-step table truncated to its last int(steps·strength) steps; the image's
  latent is noised to the first kept σ (eq. F1). This is lcmkit's UNet teacher convention; diffusers'
  ``StableDiffusion3Img2ImgPipeline`` keeps steps − int(steps − steps·strength) steps, the same count whenever
  steps·strength is a whole number.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .errors import LcmkitError
from .flow_denoisers import SD3Conditioning, scheduler_sigmas, sd3_conditioning, sd3_denoiser
from .flow_solvers import FLOW_SAMPLERS
from .math.flow import flow_noise
from .solvers import Generators, randn

#: transformer class → the flow family lcmkit drives (FLUX's transformer is recognised by ``lcmkit.lora`` only)
FLOW_FAMILIES = {"SD3Transformer2DModel": "sd3"}


def flow_family(pipe) -> str | None:
    """``"sd3"`` for a pipeline whose denoiser is a supported flow transformer, None for a UNet pipeline."""
    if getattr(pipe, "unet", None) is not None:
        return None
    return FLOW_FAMILIES.get(type(getattr(pipe, "transformer", None)).__name__)


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
    loading anything; None for anything else (a UNet folder, a single file). A flow transformer lcmkit does not
    drive yet (FLUX) is refused here, in one line."""
    entry = _model_index(path).get("transformer")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if name is None:
        return None
    if name not in FLOW_FAMILIES:
        raise LcmkitError(f"{path} is a {name} pipeline; lcmkit drives SD3 / SD3.5 transformers "
                          f"({', '.join(FLOW_FAMILIES)}) and UNet pipelines, not this one yet")
    return FLOW_FAMILIES[name]


def absent_components(path) -> dict[str, None]:
    """The components a flow pipeline folder was saved without (``[null, null]``: T5 and its tokenizer when SD3
    runs without them), to pass as None: diffusers refuses to load an SD3 folder that lacks one otherwise."""
    if folder_flow_family(path) is None:
        return {}
    return {name: None for name, entry in _model_index(path).items() if entry == [None, None]}


def check_flow_pipeline(pipe, name: str) -> None:
    """Refuse a flow pipeline lcmkit cannot drive: it needs the transformer, a VAE, the scheduler and at least one
    CLIP text encoder (T5 may be absent)."""
    missing = [c for c in ("vae", "scheduler") if getattr(pipe, c, None) is None]
    if getattr(pipe, "text_encoder", None) is None and getattr(pipe, "text_encoder_2", None) is None:
        missing.append("text_encoder")
    if missing:
        raise LcmkitError(f"{name} ({type(pipe).__name__}) lacks {', '.join(missing)}; lcmkit samples complete "
                          "SD3 pipelines (T5 may be absent)")


def latent_size(pipe) -> int:
    """The transformer's native latent side (``sample_size``); pixels = this × the VAE scale factor."""
    return pipe.transformer.config.sample_size


class FlowSampling:
    """One ``generate`` call on an SD3 pipeline: the sigma table, the prompt encoding, then images batch by batch
    (the interface :func:`lcmkit.pipelines.generate_batches` drives for every family). ``eta`` (TCD's γ) has no
    flow sampler to go to and is not read."""

    def __init__(self, pipe, *, sampler: str, steps: int, guidance: float, negative_prompt: str | None,
                 strength: float, init_image, height: int, width: int, device, eta: float = 0.0):
        from .pipelines import check_negative_prompt, vae_scale_factor

        if sampler not in FLOW_SAMPLERS:
            raise LcmkitError(f"sampler {sampler} is for UNet models; a flow-matching model (SD3) samples with "
                              f"{', '.join(FLOW_SAMPLERS)}")
        self.pipe, self.sampler, self.device = pipe, sampler, device
        self.negative_prompt, self.init_image = negative_prompt, init_image
        self.use_cfg = guidance > 1.0
        check_negative_prompt(negative_prompt, self.use_cfg, guidance)
        self.omega = guidance - 1.0 if self.use_cfg else None
        f = vae_scale_factor(pipe)
        self.latent_shape = (pipe.transformer.config.in_channels, height // f, width // f)
        self.height, self.width = height, width
        sigmas = scheduler_sigmas(pipe.scheduler.config, steps, self.latent_shape[1:],
                                  pipe.transformer.config.patch_size)
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
        self.cond1, self.uncond1 = sd3_conditioning(self.pipe, prompts, self.negative_prompt, self.use_cfg)

    def __call__(self, prompt: str | list[str], seeds: list[int], step_done) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] for ``seeds`` (one generator each), decoded by the VAE."""
        from .pipelines import decode_latents

        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        if isinstance(prompt, str):
            cond = self.cond1.repeat(len(seeds))
            uncond = None if self.uncond1 is None else self.uncond1.repeat(len(seeds))
        else:
            cond, uncond = sd3_conditioning(self.pipe, prompt, self.negative_prompt, self.use_cfg)
        latents = sample_flow_latents(self.pipe, cond, uncond, self.omega, self.sampler, self.sigmas, generators,
                                      self.latent_shape, init_image=self.init_image, size=(self.height, self.width),
                                      callback=step_done)
        return decode_latents(self.pipe, latents)


def sample_flow_latents(pipe, cond: SD3Conditioning, uncond: SD3Conditioning | None, omega: float | None,
                        sampler: str, sigmas: Tensor, generator: Generators, latent_shape: tuple[int, int, int], *,
                        noise_generator: Generators = None, init_image=None, size: tuple[int, int] | None = None,
                        callback=None, transformer=None) -> Tensor:
    """x0 latents (B, C, h, w) of a flow sampler over ``sigmas`` (σ_0 > … > 0), in the conditioning's dtype, with
    ``transformer`` (default the pipeline's; distillation passes its target θ⁻).

    Draws from ``generator`` (one, or one per image) in diffusers' order: text-to-image the initial latent
    x_{σ_0} ~ N(0, I); image-to-image the VAE posterior sample of ``init_image`` (at ``size`` pixels), then ε, and
    x_{σ_0} = (1 − σ_0)·z0 + σ_0·ε (eq. F1). The LCM sampler's per-step ε come from ``noise_generator`` (default
    ``generator``).
    """
    from .pipelines import encode_image

    device, dtype = sigmas.device, cond.encoder_hidden_states.dtype
    shape = (len(cond), *latent_shape)
    if init_image is None:
        x = randn(shape, generator, device, dtype)
    else:
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * len(cond)
        z0 = encode_image(pipe, init_image, gens, *size).to(dtype)
        x = flow_noise(z0, randn(shape, generator, device, dtype), sigmas[0])
    denoiser = sd3_denoiser(pipe.transformer if transformer is None else transformer, cond, uncond=uncond, omega=omega,
                            num_train_timesteps=pipe.scheduler.config.get("num_train_timesteps", 1000))
    latents = FLOW_SAMPLERS[sampler](denoiser, x, sigmas, generator if noise_generator is None else noise_generator,
                                     callback=callback)
    return latents.to(dtype)


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
    from .pipelines import decode_latents, to_pil, vae_scale_factor

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    guided = guidance_scale > 1
    cond, uncond = sd3_conditioning(pipe, prompts, negative_prompt, guided)
    f = vae_scale_factor(pipe)
    height = height or latent_size(pipe) * f
    width = width or latent_size(pipe) * f
    latent_shape = (pipe.transformer.config.in_channels, height // f, width // f)
    sigmas = scheduler_sigmas(pipe.scheduler.config, steps, latent_shape[1:], pipe.transformer.config.patch_size)
    latents = sample_flow_latents(pipe, cond, uncond, guidance_scale - 1 if guided else None, sampler,
                                  sigmas.to(pipe.transformer.device), generator, latent_shape,
                                  noise_generator=noise_generator)
    if output_type == "latent":
        return latents
    images = decode_latents(pipe, latents)
    return images if output_type == "pt" else to_pil(images)
