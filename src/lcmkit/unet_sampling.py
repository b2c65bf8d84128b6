"""Sampling a UNet pipeline (SD 1.x/2.x, SDXL, full LCM) for ``generate``: lcmkit's consistency samplers, or the
teacher baselines through diffusers' DDIM / DPM-Solver(++) schedulers. :class:`UnetSampling` is one generate call's
plan (:func:`lcmkit.pipelines.generate_batches` drives it; :class:`lcmkit.flow_pipelines.FlowSampling` is the flow
models' counterpart); the conventions are in :mod:`lcmkit.pipelines`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .denoisers import has_w_embedding, unet_denoiser
from .errors import LcmkitError
from .math.schedule import alphas_cumprod_from_config
from .math.timesteps import lcm_timesteps
from .options import SAMPLER_NAMES, batch_that_fits
from .solvers import SAMPLERS


def teacher_scheduler(pipe, sampler: str):
    """diffusers' DDIM / DPM-Solver(++) multistep (order 2) scheduler built from the pipeline's scheduler config,
    fed ε̂ (whatever the model predicts, the denoiser hands over ε̂, so ``prediction_type`` is set to epsilon)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = dict(pipe.scheduler.config, prediction_type="epsilon")
    # latent diffusion never clips x̂0: DDIM's default clip_sample=True would clamp unit-variance latents to
    # [-1, 1] whenever the folder's config (e.g. a DPM-Solver one) does not say otherwise; SD's configs say False
    config["clip_sample"] = False
    config.setdefault("set_alpha_to_one", False)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "dpm-solver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    # diffusers refuses final_sigmas_type="zero" (its default) for the noise-prediction algorithm
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver", solver_order=2,
                                                   final_sigmas_type="sigma_min")


def teacher_timesteps(scheduler, steps: int, strength: float) -> list[int]:
    """The scheduler's ``steps``-step schedule, truncated to its last int(steps·strength) steps for img2img."""
    if steps > scheduler.config.num_train_timesteps:
        raise LcmkitError(f"{steps} steps exceed the {scheduler.config.num_train_timesteps} training timesteps")
    scheduler.set_timesteps(steps)
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise LcmkitError(f"strength {strength} leaves no step out of {steps}; raise strength or steps")
    start = steps - kept
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return [int(t) for t in scheduler.timesteps[start * scheduler.order:]]


def sample_teacher(scheduler, denoiser, x: Tensor, timesteps: list[int], callback=None) -> Tensor:
    """lcmkit's loop over a diffusers multistep scheduler: ε̂ from the (guided) denoiser → ``scheduler.step``."""
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        _, eps_hat = denoiser(x_in, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x = scheduler.step(eps_hat.to(x.dtype), t, x, return_dict=False)[0]
        if callback is not None:
            callback(i)
    return x


class UnetSampling:
    """One ``generate`` call on a UNet pipeline: the timesteps (or the teacher's scheduler), the prompt encoding,
    then images batch by batch (:class:`lcmkit.flow_pipelines.FlowSampling` is the flow models' counterpart)."""

    def __init__(self, pipe, *, sampler, steps, guidance, negative_prompt, strength, init_image, height, width,
                 device, eta):
        from .pipelines import check_negative_prompt

        if sampler not in SAMPLER_NAMES:
            raise LcmkitError(f"sampler {sampler} is for flow-matching models (SD3, FLUX); a UNet model samples with "
                              f"{', '.join(SAMPLER_NAMES)}")
        self.pipe, self.sampler, self.steps, self.strength, self.eta = pipe, sampler, steps, strength, eta
        self.guidance, self.negative_prompt, self.init_image = guidance, negative_prompt, init_image
        self.height, self.width, self.device = height, width, device
        self.full_lcm = has_w_embedding(pipe.unet)
        self.use_cfg = not self.full_lcm and guidance > 1.0
        if negative_prompt is not None and self.full_lcm:
            raise LcmkitError("this model is a full LCM: guidance enters through its w-embedding and it was "
                              "distilled with the empty prompt as the unconditional, so a negative prompt cannot be "
                              "applied; drop the negative prompt (or use a base model with LCM-LoRA and guidance > 1)")
        check_negative_prompt(negative_prompt, self.use_cfg, guidance)
        self.alphas_cumprod = alphas_cumprod_from_config(pipe.scheduler.config).to(device)
        if sampler in SAMPLERS:
            original = int(pipe.scheduler.config.get("original_inference_steps", 50))
            self.timesteps = lcm_timesteps(steps, len(self.alphas_cumprod), original, strength)
            self.scheduler = None
        else:
            self.scheduler = teacher_scheduler(pipe, sampler)
            self.timesteps = teacher_timesteps(self.scheduler, steps, strength)
        self.num_steps = len(self.timesteps)
        self.cond1 = self.uncond1 = None

    def batch_that_fits(self, wanted: int) -> int:
        from .pipelines import vae_scale_factor

        return batch_that_fits(self.pipe, wanted, self.height, self.width, vae_scale_factor(self.pipe), self.use_cfg,
                               self.device)

    def encode_first(self, prompts: list[str]) -> None:
        """The conditioning of one prompt, repeated for every batch of a single-prompt call."""
        from .pipelines import encode_prompt, encode_unconditional

        pipe, h, w = self.pipe, self.height, self.width
        self.cond1 = encode_prompt(pipe, prompts, h, w)
        self.uncond1 = encode_unconditional(pipe, self.negative_prompt, 1, h, w, self.cond1) if self.use_cfg else None

    def __call__(self, prompt, seeds: list[int], step_done) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] for ``seeds`` (one generator each)."""
        from .pipelines import _repeat, decode_latents, encode_image, encode_prompt, initial_latents, noise_to

        pipe, n, omega = self.pipe, len(seeds), self.guidance - 1.0
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        cond = _repeat(self.cond1, n) if isinstance(prompt, str) else encode_prompt(pipe, prompt, self.height,
                                                                                     self.width)
        denoiser = unet_denoiser(
            pipe.unet, self.alphas_cumprod, cond, prediction_type=pipe.scheduler.config.get("prediction_type",
                                                                                             "epsilon"),
            uncond=None if self.uncond1 is None else _repeat(self.uncond1, n),
            omega=omega if self.uncond1 is not None else None, w_omega=omega if self.full_lcm else None)
        latent_dtype = cond.encoder_hidden_states.dtype
        if self.init_image is None:
            x = initial_latents(pipe, generators, self.height, self.width, latent_dtype, self.device)
            if self.scheduler is not None:
                x = x * self.scheduler.init_noise_sigma
        else:
            z0 = encode_image(pipe, self.init_image, generators, self.height, self.width).to(latent_dtype)
            x = noise_to(z0, self.timesteps[0], self.alphas_cumprod, generators)
        if self.scheduler is None:
            extra = {"gamma": self.eta} if self.sampler == "tcd" else {}
            z0_hat = SAMPLERS[self.sampler](denoiser, x, self.timesteps, self.alphas_cumprod, generators,
                                            callback=step_done, **extra)
        else:
            # a multistep scheduler keeps history: start each batch afresh
            teacher_timesteps(self.scheduler, self.steps, self.strength)
            z0_hat = sample_teacher(self.scheduler, denoiser, x, self.timesteps, callback=step_done)
        return decode_latents(pipe, z0_hat)
