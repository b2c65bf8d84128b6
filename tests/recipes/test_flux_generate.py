"""``lcmkit generate`` on tiny random FluxPipeline folders (``tiny.tiny_flux``: a guidance-embedded transformer like
FLUX.1-dev, and one without the embedding like schnell) against diffusers' ``FluxPipeline`` and
``FluxImg2ImgPipeline`` for the same seeds, through the command line; FLUX inputs that cannot be honoured are
one-line errors. The LoRA path (``--lora`` with the files ``lcmkit distill`` writes) is in test_flux_distill.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flow_checks import diffusers_pipeline, eight_bit, png_pixels
from flow_checks import run_generate as _generate

torch.set_num_threads(1)

PROMPT = "a red circle"
SIZE = ["--height", 64, "--width", 96]  # an 8×12 latent: 4×6 = 24 tokens, not square, so rows and columns differ
DIFFUSERS_SIZE = dict(height=64, width=96)


def flux_pipeline(folder, scheduler=None):
    """The folder as diffusers loads it, with ``scheduler`` (a class) built from its config."""
    from diffusers import FluxPipeline

    return diffusers_pipeline(FluxPipeline, folder, scheduler)


def test_cli_generate_on_flux_dev_matches_fluxpipeline(tiny_flux_dir, tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, FluxImg2ImgPipeline
    from PIL import Image

    common = [tiny_flux_dir, "--prompt", PROMPT, "--seed", 5, "--device", "cpu", *SIZE]
    # Euler, 3 steps, --guidance 2.5 into the guidance embedding (one forward)
    code, err = _generate([*common, "--sampler", "euler", "--steps", 3, "--guidance", 2.5,
                           "--out", tmp_path / "euler.png"], capsys)
    assert code == 0, err
    pipe = flux_pipeline(tiny_flux_dir, FlowMatchEulerDiscreteScheduler)
    ref = pipe(PROMPT, num_inference_steps=3, guidance_scale=2.5, output_type="pt",
               generator=torch.Generator().manual_seed(5), **DIFFUSERS_SIZE).images
    assert torch.equal(png_pixels(tmp_path / "euler.png"), eight_bit(ref))
    # LCM, one step (FlowMatchLCMScheduler draws no ε before the last step), guidance left to its default: 3.5,
    # FluxPipeline's
    code, err = _generate([*common, "--steps", 1, "--out", tmp_path / "lcm.png"], capsys)
    assert code == 0, err
    lcm = flux_pipeline(tiny_flux_dir, FlowMatchLCMScheduler)
    ref = lcm(PROMPT, num_inference_steps=1, output_type="pt", generator=torch.Generator().manual_seed(5),
              **DIFFUSERS_SIZE).images
    assert torch.equal(png_pixels(tmp_path / "lcm.png"), eight_bit(ref))
    # image-to-image, Euler at strength 0.5 of 4 steps: the last 2 steps, as FluxImg2ImgPipeline runs them (its
    # default guidance is 7, FluxPipeline's 3.5: lcmkit's default is FluxPipeline's, so g is given to it here)
    code, err = _generate([*common, "--sampler", "euler", "--steps", 4, "--init-image", tmp_path / "euler.png",
                           "--strength", 0.5, "--out", tmp_path / "i2i.png"], capsys)
    assert code == 0, err
    i2i = FluxImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    ref = i2i(PROMPT, image=Image.open(tmp_path / "euler.png"), strength=0.5, num_inference_steps=4,
              guidance_scale=3.5, output_type="pt", generator=torch.Generator().manual_seed(5),
              **DIFFUSERS_SIZE).images
    assert torch.equal(png_pixels(tmp_path / "i2i.png"), eight_bit(ref))
    # Heun runs (FluxPipeline cannot drive FlowMatchHeunDiscreteScheduler to compare with)
    code, err = _generate([*common, "--sampler", "heun", "--steps", 2, "--out", tmp_path / "heun.png"], capsys)
    assert code == 0 and (tmp_path / "heun.png").is_file(), err


def test_generate_on_flux_gives_image_i_from_seed_s_plus_i(tiny_flux_dir):
    """Two images in one batch, one step of LCM: each is FluxPipeline's image for its own seed."""
    from diffusers import FlowMatchLCMScheduler

    from lcmkit.pipelines import generate

    ours = generate(str(tiny_flux_dir), PROMPT, steps=1, seed=7, num_images=2, guidance=2.0, output_type="np",
                    device="cpu", progress=False, **DIFFUSERS_SIZE)
    pipe = flux_pipeline(tiny_flux_dir, FlowMatchLCMScheduler)
    ref = pipe(PROMPT, num_inference_steps=1, guidance_scale=2.0, num_images_per_prompt=2, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **DIFFUSERS_SIZE).images
    assert ours.shape == ref.shape == (2, 64, 96, 3)
    assert np.abs(ours - ref).max() < 1e-6


def test_cli_generate_on_flux_without_guidance_embedding_is_true_cfg(tiny_flux_schnell_dir, tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler

    common = [tiny_flux_schnell_dir, "--prompt", PROMPT, "--seed", 2, "--device", "cpu", "--sampler", "euler",
              "--steps", 3, *SIZE]
    pipe = flux_pipeline(tiny_flux_schnell_dir, FlowMatchEulerDiscreteScheduler)
    # g = 4 with a negative prompt: FluxPipeline's true CFG at true_cfg_scale 4
    code, err = _generate([*common, "--guidance", 4, "--negative-prompt", "blue", "--out", tmp_path / "cfg.png"],
                          capsys)
    assert code == 0, err
    ref = pipe(PROMPT, negative_prompt="blue", true_cfg_scale=4.0, num_inference_steps=3, output_type="pt",
               generator=torch.Generator().manual_seed(2), **DIFFUSERS_SIZE).images
    assert (png_pixels(tmp_path / "cfg.png").int() - eight_bit(ref).int()).abs().max() <= 1
    # the default g = 1: the conditional model alone, as FluxPipeline without true CFG
    code, err = _generate([*common, "--out", tmp_path / "plain.png"], capsys)
    assert code == 0, err
    ref = pipe(PROMPT, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(2),
               **DIFFUSERS_SIZE).images
    assert torch.equal(png_pixels(tmp_path / "plain.png"), eight_bit(ref))


@pytest.mark.parametrize("teacher, extra, message", [
    ("tiny_flux_dir", ["--negative-prompt", "blue"], "is guidance-distilled: guidance 3.5 goes into its guidance "
                                                     "embedding"),
    ("tiny_flux_dir", ["--negative-prompt", "blue", "--guidance", 5], "guidance 5 goes into its guidance embedding"),
    ("tiny_flux_schnell_dir", ["--negative-prompt", "blue"], "a negative prompt needs classifier-free guidance"),
    ("tiny_flux_dir", ["--sampler", "tcd"], "sampler tcd is for UNet models; a flow-matching model (SD3, FLUX)"),
    ("tiny_flux_dir", ["--height", 72], "height must be a positive multiple of 16 (the VAE scale factor × the "
                                        "transformer's patch)"),
])
def test_cli_generate_refuses_what_flux_cannot_honour(teacher, extra, message, request, tmp_path, capsys):
    folder = request.getfixturevalue(teacher)
    code, err = _generate([folder, "--prompt", PROMPT, "--device", "cpu", *SIZE, "--out", tmp_path / "x.png", *extra],
                          capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()
