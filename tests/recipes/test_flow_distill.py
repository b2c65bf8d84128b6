"""lcmkit distill and generate on a tiny random SD3 teacher (``tiny.tiny_sd3``: no T5): a short flow distillation
lowers the fixed-draw loss and writes a LoRA that diffusers' StableDiffusion3Pipeline loads whole and samples to
the same image as lcmkit; resume is bit-exact; ``lcmkit generate`` matches diffusers' SD3 pipelines; options that do
not apply to flow teachers are one-line errors.

Runs use the built-in world as data (a fixed small batch), LoRA rank 4 / alpha 8 (scale 2, so a lost alpha would
show), no text cache (the world's every caption would be encoded first).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixed_losses import distill_loss as fixed_draw_loss
from flow_checks import assert_resume_is_exact, diffusers_pipeline, eight_bit, png_pixels, quiet
from flow_checks import run_generate as _generate

from lcmkit.train.checkpoint import checkpoint_dirs
from lcmkit.train.config import build_config
from lcmkit.train.distill import DistillConfig, distill

torch.set_num_threads(1)

PROMPT = "a red circle"


def make_cfg(teacher, out, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), data="world", out=str(out), lora_rank=4, lora_alpha=8.0, batch_size=2,
                generated_samples=2, max_steps=4, lr=1e-3, warmup_steps=0, validate_every=0, checkpoint_every=100,
                log_every=1, progress=False, device="cpu", cache_text=False, validation_steps=[1, 2])
    base.update(kw)
    return build_config(DistillConfig, None, base)


def latest(out) -> Path:
    return checkpoint_dirs(out)[-1]


def sd3_pipeline(folder, scheduler=None):
    """The folder as diffusers loads it (T5 absent), with ``scheduler`` (a class) built from its config."""
    from diffusers import StableDiffusion3Pipeline

    return diffusers_pipeline(StableDiffusion3Pipeline, folder, scheduler, text_encoder_3=None, tokenizer_3=None)


# --------------------------------------------------------------------------------------------------------------
# a short run: the loss goes down, the LoRA loads in diffusers and samples as lcmkit samples it
# --------------------------------------------------------------------------------------------------------------

def test_short_flow_distillation_lowers_loss_and_its_lora_loads_in_diffusers(tiny_sd3_dir, tmp_path):
    from diffusers import FlowMatchLCMScheduler
    from safetensors.torch import load_file

    from lcmkit.flow_pipelines import sample_sd3
    from lcmkit.lora import LORA_WEIGHT_NAME, lora_layers
    from lcmkit.pipelines import applied_loras, generate

    # 16 steps at lr 1e-3 on a fixed batch of 2 (the fixed-draw loss falls by 1–3.5% over seeds 0–3)
    cfg = make_cfg(tiny_sd3_dir, tmp_path / "run", max_steps=16, lr=1e-3, validate_every=16)
    assert (cfg.solver, cfg.lora_format) == ("euler", "diffusers,comfyui")
    before = fixed_draw_loss(cfg, draws=6)
    result = distill(cfg)
    after = fixed_draw_loss(cfg, latest(cfg.out), draws=6)
    assert after < before, (before, after)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 16 and summary["nonfinite_skipped"] == 0
    assert (tmp_path / "run" / "validation" / "step-0000016.png").is_file()
    comfyui = result / "pytorch_lora_weights_comfyui.safetensors"
    assert result.name == "lora" and sorted(p.name for p in result.iterdir()) == ["config.yaml", LORA_WEIGHT_NAME,
                                                                                  comfyui.name]

    # every trained layer is in the files, with transformer.* keys (the comfyui one with an alpha tensor each), and
    # diffusers applies every one of its file
    trained = {k.split(".lora_A.")[0] for k in load_file(str(latest(cfg.out) / "lora.safetensors")) if ".lora_A." in k}
    keys = load_file(str(result / LORA_WEIGHT_NAME)).keys()
    assert all(k.startswith("transformer.") for k in keys) and len(keys) == 2 * len(trained) == 42
    alphas = {k: v for k, v in load_file(str(comfyui)).items() if k.endswith(".alpha")}
    assert len(alphas) == len(trained) and all(float(v) == 8.0 for v in alphas.values())
    theirs = sd3_pipeline(tiny_sd3_dir, FlowMatchLCMScheduler)
    theirs.load_lora_weights(str(result))
    assert set(lora_layers(theirs.transformer)) == trained

    # diffusers' pipeline with the LoRA (4 LCM steps; its per-step ε from the global RNG) == lcmkit's sampler on the
    # teacher with the same file applied by lcmkit's own loader; and it differs from the teacher alone
    torch.manual_seed(7)
    ref = theirs(PROMPT, num_inference_steps=4, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(3)).images
    ours_pipe = sd3_pipeline(tiny_sd3_dir)
    with applied_loras(ours_pipe, [result / LORA_WEIGHT_NAME]):
        torch.manual_seed(7)
        ours = sample_sd3(ours_pipe, PROMPT, steps=4, output_type="pt", generator=torch.Generator().manual_seed(3),
                          noise_generator=torch.default_generator)
    torch.manual_seed(7)
    base = sample_sd3(ours_pipe, PROMPT, steps=4, output_type="pt", generator=torch.Generator().manual_seed(3),
                      noise_generator=torch.default_generator)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)
    assert (ours - base).abs().max() > 1e-3
    # lcmkit generate (one step: no per-step ε) with --lora == diffusers with load_lora_weights, from either file
    # (the comfyui one's alpha tensors read: scale 2)
    ref_one = theirs(PROMPT, num_inference_steps=1, guidance_scale=1.0, output_type="np",
                     generator=torch.Generator().manual_seed(3)).images
    for file in (result / LORA_WEIGHT_NAME, comfyui):
        one = generate(str(tiny_sd3_dir), PROMPT, steps=1, seed=3, loras=[file], output_type="np", device="cpu",
                       progress=False)
        assert abs(one - ref_one).max() < 2e-5, file.name


# --------------------------------------------------------------------------------------------------------------
# resume: N steps straight == N/2, stop, resume, N/2 more (bit for bit)
# --------------------------------------------------------------------------------------------------------------

def test_flow_kill_and_resume_is_exact(tiny_sd3_dir, tmp_path):
    from safetensors.torch import load_file

    # an EMA target of the adapter (checkpointed beside it), 2 micro-batches, cosine schedule with warm-up, Heun
    a, _ = assert_resume_is_exact(make_cfg, tiny_sd3_dir, tmp_path, max_steps=2, lora_ema=0.5, batch_size=1,
                                  generated_samples=3, grad_accum=2, warmup_steps=1, lr_schedule="cosine",
                                  checkpoint_every=1, lr=1e-3, solver="heun")
    assert {"lora.safetensors", "lora_target.safetensors"} <= {f.name for f in a.glob("*.safetensors")}
    # the exported LoRA is θ⁻ (the EMA), as the UNet recipe exports it
    ema = load_file(str(a / "lora_target.safetensors"))
    exported = load_file(str(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(exported["transformer." + k.replace(".default", "")], v) for k, v in ema.items())


# --------------------------------------------------------------------------------------------------------------
# lcmkit generate on an SD3 folder == diffusers' SD3 pipelines
# --------------------------------------------------------------------------------------------------------------

def test_cli_generate_on_sd3_matches_diffusers(tiny_sd3_dir, tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, StableDiffusion3Img2ImgPipeline
    from PIL import Image

    common = [tiny_sd3_dir, "--prompt", PROMPT, "--seed", 5, "--device", "cpu"]
    # Euler, 3 steps with CFG and a negative prompt
    code, err = _generate([*common, "--sampler", "euler", "--steps", 3, "--guidance", 3, "--negative-prompt", "blue",
                           "--out", tmp_path / "euler.png"], capsys)
    assert code == 0, err
    pipe = sd3_pipeline(tiny_sd3_dir, FlowMatchEulerDiscreteScheduler)
    ref = pipe(PROMPT, negative_prompt="blue", num_inference_steps=3, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(5)).images
    assert (png_pixels(tmp_path / "euler.png").int() - eight_bit(ref).int()).abs().max() <= 1
    # LCM, one step: FlowMatchLCMScheduler draws no ε before the last step
    code, err = _generate([*common, "--steps", 1, "--out", tmp_path / "lcm.png"], capsys)
    assert code == 0, err
    lcm = sd3_pipeline(tiny_sd3_dir, FlowMatchLCMScheduler)
    ref = lcm(PROMPT, num_inference_steps=1, guidance_scale=1.0, output_type="pt",
              generator=torch.Generator().manual_seed(5)).images
    assert torch.equal(png_pixels(tmp_path / "lcm.png"), eight_bit(ref))
    # image-to-image, Euler at strength 0.5 of 4 steps: the last 2 steps, as StableDiffusion3Img2ImgPipeline runs
    code, err = _generate([*common, "--sampler", "euler", "--steps", 4, "--init-image", tmp_path / "euler.png",
                           "--strength", 0.5, "--out", tmp_path / "i2i.png"], capsys)
    assert code == 0, err
    i2i = quiet(StableDiffusion3Img2ImgPipeline(**pipe.components))
    ref = i2i(PROMPT, image=Image.open(tmp_path / "euler.png"), strength=0.5, num_inference_steps=4,
              guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(5)).images
    assert (png_pixels(tmp_path / "i2i.png").int() - eight_bit(ref).int()).abs().max() <= 1
    # Heun runs (diffusers' SD3 pipeline cannot drive FlowMatchHeunDiscreteScheduler to compare with)
    code, err = _generate([*common, "--sampler", "heun", "--steps", 2, "--out", tmp_path / "heun.png"], capsys)
    assert code == 0 and (tmp_path / "heun.png").is_file(), err


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "ddim"], "sampler ddim is for UNet models"),
    (["--sampler", "tcd"], "sampler tcd is for UNet models"),
    (["--negative-prompt", "blue"], "a negative prompt needs classifier-free guidance"),
])
def test_cli_generate_refuses_unet_options_on_sd3(extra, message, tiny_sd3_dir, tmp_path, capsys):
    code, err = _generate([tiny_sd3_dir, "--prompt", PROMPT, "--device", "cpu", "--out", tmp_path / "x.png", *extra],
                          capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_cli_generate_refuses_flow_samplers_on_a_unet(tiny_sd_dir, tmp_path, capsys):
    code, err = _generate([tiny_sd_dir, "--prompt", PROMPT, "--device", "cpu", "--out", tmp_path / "x.png",
                           "--sampler", "euler"], capsys)
    assert code == 2 and "sampler euler is for flow-matching models" in err and len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------------------------------------------
# options that do not apply to the teacher: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher, extra, message", [
    ("tiny_sd3_dir", ["--mode", "full"], "--mode full puts ω into a guidance embedding"),
    ("tiny_sd3_dir", ["--solver", "ddim"], "solver ddim is for UNet (DDPM) teachers; this teacher takes euler, heun"),
    ("tiny_sd3_dir", ["--solver", "dpm-solver++"], "solver dpm-solver++ is for UNet (DDPM) teachers"),
    ("tiny_sd3_dir", ["--lora-format", "diffusers,kohya"], "kohya has no key names for a transformer"),
    ("tiny_sd3_dir", ["--lora-format", "kohya,diffusers"], "kohya has no key names for a transformer"),
    ("tiny_sd3_dir", ["--lora-format", "kohya"], "kohya has no key names for a transformer"),
    ("tiny_sd_dir", ["--solver", "euler"], "solver euler is for flow-matching (SD3, FLUX) teachers; this teacher "
                                           "takes ddim"),
])
def test_bad_options_for_the_teacher_are_one_line(teacher, extra, message, request, tmp_path, capsys):
    from lcmkit.cli import main

    out, folder = tmp_path / "o", request.getfixturevalue(teacher)
    capsys.readouterr()
    code = main(["distill", "--teacher", str(folder), "--data", "world", "--out", str(out),
                 "--max-steps", "1", "--no-progress", *extra])  # (short, should a refusal ever be missed)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_flow_teacher_default_omega_and_lora_format(tiny_sd3_dir, tiny_sd_dir, tmp_path):
    from lcmkit.train.distill import omega_range

    cfg = make_cfg(tiny_sd3_dir, tmp_path / "o")
    assert (cfg.solver, cfg.lora_format, cfg.lora_rank) == ("euler", "diffusers,comfyui", 4)
    assert omega_range(cfg, "sd3") == (2.5, 6.0)
    # an explicit value is honoured as given
    assert make_cfg(tiny_sd3_dir, tmp_path / "o", lora_format="peft,diffusers").lora_format == "peft,diffusers"
    assert make_cfg(tiny_sd3_dir, tmp_path / "o", lora_format="diffusers").lora_format == "diffusers"
    # a UNet teacher's default is unchanged: the kohya file and diffusers'
    assert build_config(DistillConfig, None, dict(teacher=str(tiny_sd_dir), data="world",
                                                  out=str(tmp_path / "u"))).lora_format == "kohya,diffusers"
    assert build_config(DistillConfig, None, dict(teacher=str(tiny_sd3_dir), data="world",
                                                  out=str(tmp_path / "o"))).lora_rank == 64
