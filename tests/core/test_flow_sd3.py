"""The SD3 flow denoiser and sampling on a tiny random StableDiffusion3Pipeline (no T5) against diffusers' own
pipeline with FlowMatchLCMScheduler / FlowMatchEulerDiscreteScheduler, for the same seeds."""

import pytest
import torch
import tiny
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

from lcmkit.flow_denoisers import SD3Conditioning, sd3_denoiser
from lcmkit.flow_pipelines import sample_sd3

PROMPT = "a red circle"


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler,scheduler",
                         [("lcm", FlowMatchLCMScheduler), ("euler", FlowMatchEulerDiscreteScheduler)])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_same_seed_same_image_as_diffusers(sampler, scheduler, guidance_scale, monkeypatch):
    import lcmkit.flow_denoisers as fd

    pipe = quiet(tiny.tiny_sd3(scheduler=scheduler(shift=3.0)))
    # diffusers' SD3 pipeline does not pass its generator to scheduler.step: the LCM's ε comes from the global RNG
    torch.manual_seed(11)
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=guidance_scale, output_type="pt",
               generator=torch.Generator().manual_seed(3)).images

    def ours():
        torch.manual_seed(11)
        return sample_sd3(pipe, PROMPT, steps=4, guidance_scale=guidance_scale, sampler=sampler, output_type="pt",
                          generator=torch.Generator().manual_seed(3), noise_generator=torch.default_generator)

    collapsed = ours()  # the 256 zero T5 tokens as one token of multiplicity 256: the same image up to rounding
    assert collapsed.shape == ref.shape == (1, 3, 64, 64)
    torch.testing.assert_close(collapsed, ref, rtol=0, atol=1e-5)
    monkeypatch.setattr(fd, "uses_default_attention", lambda transformer: False)  # diffusers' attention as it is
    # exact without CFG; with CFG (1 + ω)·v_c − ω·v_∅ and diffusers' v_∅ + g·(v_c − v_∅) round differently
    torch.testing.assert_close(ours(), ref, rtol=0, atol=0 if guidance_scale == 1.0 else 1e-5)


def test_default_noise_comes_from_the_images_generator_only():
    pipe = quiet(tiny.tiny_sd3(scheduler=FlowMatchLCMScheduler(shift=3.0)))
    images = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        images.append(sample_sd3(pipe, PROMPT, steps=4, output_type="latent",
                                 generator=torch.Generator().manual_seed(5)))
    assert torch.equal(*images)


def test_denoiser_is_x0_and_velocity_with_batched_cfg():
    pipe = tiny.tiny_sd3()
    emb, neg, pooled, neg_pooled = pipe.encode_prompt([PROMPT] * 2, None, None, negative_prompt="blue")
    cond, uncond = SD3Conditioning(emb, pooled), SD3Conditioning(neg, neg_pooled)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        x0, v = sd3_denoiser(pipe.transformer, cond)(x, sigma)
        _, v_u = sd3_denoiser(pipe.transformer, uncond)(x, sigma)
        _, v_cfg = sd3_denoiser(pipe.transformer, cond, uncond=uncond, omega=2.5)(x, sigma)
        raw = pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=emb,
                               pooled_projections=pooled, return_dict=False)[0]
        _, v_plain = sd3_denoiser(pipe.transformer, cond, collapse_padding=False)(x, sigma)
    torch.testing.assert_close(v_plain, raw, rtol=0, atol=0)
    torch.testing.assert_close(v, raw, rtol=0, atol=2e-6)  # the zero T5 tokens collapsed: rounding only
    torch.testing.assert_close(x0, x - sigma.reshape(2, 1, 1, 1) * v, rtol=0, atol=0)
    torch.testing.assert_close(v_cfg, v_u + 3.5 * (v - v_u), rtol=1e-5, atol=1e-5)  # g = ω + 1 = 3.5
    with pytest.raises(ValueError):
        sd3_denoiser(pipe.transformer, cond, uncond=uncond)
