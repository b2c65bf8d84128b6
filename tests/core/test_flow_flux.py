"""The FLUX flow denoiser and sampling on tiny random FluxPipelines (guidance-embedded like FLUX.1-dev, and without
the embedding like schnell) against diffusers' own pipeline with FlowMatchLCMScheduler /
FlowMatchEulerDiscreteScheduler, for the same seeds; packing, ids, timestep scale and the shifted schedule against
diffusers' own helpers."""

import numpy as np
import pytest
import tiny
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from lcmkit.flux import (
    FluxConditioning,
    flux_denoiser,
    flux_scheduler_sigmas,
    latent_image_ids,
    pack_latents,
    packed_denoiser,
    sample_flux,
    unpack_latents,
)

torch.set_num_threads(1)

PROMPT = "a red circle"
SIZE = dict(height=64, width=96)  # an 8×12 latent: 4×6 = 24 tokens, not square, so rows and columns differ
TOKENS = 16  # T5 tokens (max_sequence_length), short to keep the tiny runs cheap


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (guidance_embeds, diffusers' call arguments, sample_flux's): dev with its embedded g; schnell-like without
# guidance; schnell-like with true CFG on a negative prompt
CASES = {
    "dev-g3.5": (True, dict(guidance_scale=3.5), dict(guidance_scale=3.5)),
    "schnell": (False, {}, {}),
    "schnell-cfg4": (False, dict(true_cfg_scale=4.0, negative_prompt="blue"),
                     dict(true_cfg_scale=4.0, negative_prompt="blue")),
}


@pytest.mark.parametrize("sampler,scheduler",
                         [("lcm", FlowMatchLCMScheduler), ("euler", FlowMatchEulerDiscreteScheduler)])
@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_image_as_diffusers(sampler, scheduler, case):
    embeds, theirs, ours_kw = CASES[case]
    pipe = quiet(tiny.tiny_flux(guidance_embeds=embeds, scheduler=scheduler(**tiny.FLUX_SCHEDULER)))
    # FluxPipeline does not pass its generator to scheduler.step: the LCM's ε comes from the global RNG
    torch.manual_seed(11)
    ref = pipe(PROMPT, num_inference_steps=4, output_type="pt", max_sequence_length=TOKENS,
               generator=torch.Generator().manual_seed(3), **SIZE, **theirs).images
    torch.manual_seed(11)
    ours = sample_flux(pipe, PROMPT, steps=4, sampler=sampler, output_type="pt", max_sequence_length=TOKENS,
                       generator=torch.Generator().manual_seed(3), noise_generator=torch.default_generator,
                       **SIZE, **ours_kw)
    assert ours.shape == ref.shape == (1, 3, 64, 96)
    # exact without true CFG; with it, the batched [uncond; cond] forward and (1 + ω)·v_c − ω·v_∅ round differently
    # from diffusers' two forwards and v_∅ + g·(v_c − v_∅)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 if "cfg" in case else 0)


def test_default_noise_comes_from_the_images_generator_only():
    pipe = quiet(tiny.tiny_flux(scheduler=FlowMatchLCMScheduler(**tiny.FLUX_SCHEDULER)))
    images = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        images.append(sample_flux(pipe, PROMPT, steps=3, output_type="latent", max_sequence_length=TOKENS,
                                  generator=torch.Generator().manual_seed(5), **SIZE))
    assert images[0].shape == (1, 16, 8, 12)
    assert torch.equal(*images)
    heun = sample_flux(pipe, PROMPT, steps=2, sampler="heun", output_type="latent", max_sequence_length=TOKENS,
                       generator=torch.Generator().manual_seed(5), **SIZE)  # the second-order teacher sampler
    assert heun.shape == (1, 16, 8, 12) and bool(torch.isfinite(heun).all())


def test_packing_and_ids_are_diffusers():
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 12)
    assert torch.equal(pack_latents(x), packed)
    assert torch.equal(unpack_latents(packed, (8, 12)), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 96, 8), x)
    assert torch.equal(latent_image_ids((8, 12)), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu",
                                                                                          torch.float32))
    with pytest.raises(ValueError):
        pack_latents(torch.zeros(1, 16, 7, 8))


@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("hw", [(8, 12), (128, 128), (160, 96)])
def test_schedule_is_fluxpipelines_bit_for_bit(steps, hw):
    """σ from the shift μ(L) of the image's token count, as FluxPipeline sets it on the scheduler (in float32)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**tiny.FLUX_SCHEDULER)
    seq_len = (hw[0] // 2) * (hw[1] // 2)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    ours = flux_scheduler_sigmas(scheduler.config, steps, hw)
    assert torch.equal(ours, scheduler.sigmas)
    lcm = FlowMatchLCMScheduler(**tiny.FLUX_SCHEDULER)
    lcm.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    assert torch.equal(ours, lcm.sigmas)


def test_denoiser_is_the_transformer_on_packed_tokens_in_float64():
    """v = the transformer on packed tokens, ids (0, i, j), timestep σ (it multiplies by 1000), embedded g; x̂0 = x −
    σ·v; true CFG is (1 + ω)·v_c − ω·v_∅; run in float64."""
    pipe = tiny.tiny_flux()
    pipe.to(torch.float64)
    emb, pooled, text_ids = pipe.encode_prompt([PROMPT, "blue"], None, max_sequence_length=TOKENS)
    cond = FluxConditioning(emb, pooled)
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.4], dtype=torch.float64)
    with torch.no_grad():
        x0, v = flux_denoiser(pipe.transformer, cond, guidance=2.5)(x, sigma)
        raw = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, 2, 16, 8, 12), timestep=sigma,
                               guidance=torch.full((2,), 2.5, dtype=torch.float64), encoder_hidden_states=emb,
                               pooled_projections=pooled, txt_ids=text_ids,
                               img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float64),
                               return_dict=False)[0]
        tokens_x0, tokens_v = packed_denoiser(flux_denoiser(pipe.transformer, cond, guidance=2.5), (8, 12))(
            pack_latents(x), sigma)
    assert v.dtype == torch.float64
    torch.testing.assert_close(pack_latents(v), raw, rtol=0, atol=0)
    torch.testing.assert_close(x0, x - sigma.reshape(2, 1, 1, 1) * v, rtol=0, atol=0)
    assert torch.equal(tokens_v, raw) and torch.equal(unpack_latents(tokens_x0, (8, 12)), x0)

    schnell = tiny.tiny_flux(guidance_embeds=False).to(torch.float64)
    e1, p1, _ = schnell.encode_prompt([PROMPT] * 2, None, max_sequence_length=TOKENS)
    e0, p0, _ = schnell.encode_prompt(["blue"] * 2, None, max_sequence_length=TOKENS)
    c, u = FluxConditioning(e1, p1), FluxConditioning(e0, p0)
    with torch.no_grad():
        _, v_c = flux_denoiser(schnell.transformer, c)(x, sigma)
        _, v_u = flux_denoiser(schnell.transformer, u)(x, sigma)
        _, v_cfg = flux_denoiser(schnell.transformer, c, uncond=u, omega=3.0)(x, sigma)
    torch.testing.assert_close(v_cfg, v_u + 4.0 * (v_c - v_u), rtol=1e-12, atol=1e-12)  # g = ω + 1


def test_guidance_goes_where_the_transformer_takes_it():
    dev, schnell = tiny.tiny_flux(), tiny.tiny_flux(guidance_embeds=False)
    emb, pooled, _ = dev.encode_prompt(PROMPT, None, max_sequence_length=TOKENS)
    cond = FluxConditioning(emb, pooled)
    with pytest.raises(ValueError, match="guidance-distilled"):
        flux_denoiser(dev.transformer, cond)
    with pytest.raises(ValueError, match="no guidance embedding"):
        flux_denoiser(schnell.transformer, cond, guidance=3.5)
    with pytest.raises(ValueError, match="no guidance embedding"):
        sample_flux(schnell, PROMPT, guidance_scale=3.5, max_sequence_length=TOKENS, **SIZE)
    with pytest.raises(ValueError, match="both uncond and omega"):
        flux_denoiser(schnell.transformer, cond, uncond=cond)
    # the embedded g changes the output; one forward serves any g
    x = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v1 = flux_denoiser(dev.transformer, cond, guidance=1.0)(x, torch.tensor([0.5]))[1]
        v4 = flux_denoiser(dev.transformer, cond, guidance=4.0)(x, torch.tensor([0.5]))[1]
    assert (v1 - v4).abs().max() > 1e-4
