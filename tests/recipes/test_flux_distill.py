"""lcmkit distill on tiny random FLUX teachers (``tiny.tiny_flux``): guidance-embedded like FLUX.1-dev (the teacher
guided by one forward at the embedded g = ω + 1, the student at the same g) and without the embedding like schnell
(true CFG on v). A short run lowers the fixed-draw loss; its LoRA files (diffusers and comfyui) load whole in
``FluxPipeline.load_lora_weights`` and in ``lcmkit generate --lora``, and diffusers' image with the LoRA equals
lcmkit's; resume is bit-exact; the grid is on the shifted table of the training resolution.

Runs use the built-in world as data (a fixed small batch) at 64 px (FLUX's default 1024 px would be slow), LoRA
rank 4 / alpha 8 (scale 2, so a lost alpha would show), no text cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixed_losses import distill_loss as fixed_draw_loss
from flow_checks import assert_resume_is_exact, diffusers_pipeline

from lcmkit.train.checkpoint import checkpoint_dirs
from lcmkit.train.config import build_config
from lcmkit.train.distill import DistillConfig, distill

torch.set_num_threads(1)

PROMPT = "a red circle"
COMFYUI_NAME = "pytorch_lora_weights_comfyui.safetensors"


def make_cfg(teacher, out, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), data="world", out=str(out), lora_rank=4, lora_alpha=8.0, batch_size=2,
                generated_samples=2, resolution=64, max_steps=4, lr=1e-3, warmup_steps=0, validate_every=0,
                checkpoint_every=100, log_every=1, progress=False, device="cpu", cache_text=False,
                validation_steps=[1, 2])
    base.update(kw)
    return build_config(DistillConfig, None, base)


def latest(out) -> Path:
    return checkpoint_dirs(out)[-1]


def flux_pipeline(folder, scheduler=None):
    from diffusers import FluxPipeline

    return diffusers_pipeline(FluxPipeline, folder, scheduler)


@pytest.fixture(scope="module")
def dev_run(tiny_flux_dir, tmp_path_factory):
    """16 steps at lr 1e-3 on a fixed batch of 2 on the guidance-embedded teacher (default ω ∈ [1, 4]:
    g ∈ [2, 5])."""
    cfg = make_cfg(tiny_flux_dir, tmp_path_factory.mktemp("flux_dev") / "run", max_steps=16, validate_every=16)
    return cfg, distill(cfg)


# --------------------------------------------------------------------------------------------------------------
# FLUX.1-dev-like: the loss goes down, the LoRA files load in diffusers and in lcmkit, same images
# --------------------------------------------------------------------------------------------------------------

def test_flux_dev_distillation_lowers_the_loss_and_writes_both_files(dev_run):
    from lcmkit.lora import LORA_WEIGHT_NAME

    cfg, result = dev_run
    assert (cfg.solver, cfg.lora_format) == ("euler", "diffusers,comfyui")
    assert fixed_draw_loss(cfg, latest(cfg.out), draws=6) < fixed_draw_loss(cfg, draws=6)
    out = Path(cfg.out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 16 and summary["nonfinite_skipped"] == 0
    assert (out / "validation" / "step-0000016.png").is_file()
    assert sorted(p.name for p in result.iterdir()) == ["config.yaml", LORA_WEIGHT_NAME, COMFYUI_NAME]
    # the run says which embedded g its LoRA was trained for: the g to sample it with
    config = (result / "config.yaml").read_text()
    assert "architecture: flux" in config and "embedded_guidance_range:\n  - 2.0\n  - 5.0" in config


def test_flux_dev_lora_loads_whole_in_fluxpipeline_and_lcmkit_and_samples_the_same(dev_run, tiny_flux_dir):
    from diffusers import FlowMatchLCMScheduler
    from safetensors.torch import load_file

    from lcmkit.flux import sample_flux
    from lcmkit.lora import LORA_WEIGHT_NAME, lora_layers
    from lcmkit.pipelines import applied_loras, generate

    cfg, result = dev_run
    trained = {k.split(".lora_A.")[0] for k in load_file(str(latest(cfg.out) / "lora.safetensors")) if ".lora_A." in k}
    assert len(trained) == 17  # 12 in the double-stream block, 5 in the single-stream one
    size, g = dict(height=64, width=96), 3.5  # inside the trained g ∈ [2, 5]
    for name in (LORA_WEIGHT_NAME, COMFYUI_NAME):
        theirs = flux_pipeline(tiny_flux_dir, FlowMatchLCMScheduler)
        theirs.load_lora_weights(str(result), weight_name=name)
        assert set(lora_layers(theirs.transformer)) == trained, name  # every layer of the file applied
        assert list(theirs.transformer.get_submodule("single_transformer_blocks.0.proj_mlp").scaling.values()) == [2.0]

        # diffusers' pipeline with the LoRA, 4 LCM steps (ε from the global RNG) == lcmkit's sampler on the teacher
        # with the same file applied by lcmkit's own loader; and it differs from the teacher alone
        torch.manual_seed(7)
        ref = theirs(PROMPT, num_inference_steps=4, guidance_scale=g, output_type="pt",
                     generator=torch.Generator().manual_seed(3), **size).images
        ours_pipe = flux_pipeline(tiny_flux_dir)
        with applied_loras(ours_pipe, [result / name]):
            torch.manual_seed(7)
            ours = sample_flux(ours_pipe, PROMPT, steps=4, guidance_scale=g, output_type="pt",
                               generator=torch.Generator().manual_seed(3), noise_generator=torch.default_generator,
                               **size)
        torch.manual_seed(7)
        base = sample_flux(ours_pipe, PROMPT, steps=4, guidance_scale=g, output_type="pt",
                           generator=torch.Generator().manual_seed(3), noise_generator=torch.default_generator, **size)
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5, msg=name)
        assert (ours - base).abs().max() > 1e-3

        # lcmkit generate (one step: no per-step ε) with --lora == diffusers with load_lora_weights
        one = generate(str(tiny_flux_dir), PROMPT, steps=1, seed=3, guidance=g, loras=[result / name],
                       output_type="np", device="cpu", progress=False, **size)
        ref_one = theirs(PROMPT, num_inference_steps=1, guidance_scale=g, output_type="np",
                         generator=torch.Generator().manual_seed(3), **size).images
        assert abs(one - ref_one).max() < 2e-5, name


# --------------------------------------------------------------------------------------------------------------
# the teacher's guidance, the student's, and the grid
# --------------------------------------------------------------------------------------------------------------

def _roles(cfg):
    """The recipe's own roles, grid and first batch (as the fixed-draw loss builds them)."""
    from lcmkit.pipelines import load_pipeline
    from lcmkit.train import distill as lcd
    from lcmkit.train.data import make_data
    from lcmkit.train.rng import generator_for

    pipe = load_pipeline(cfg.teacher, device="cpu", flow=True)
    models = lcd.family_of(pipe).build_models(cfg, pipe, torch.device("cpu"), generator_for(cfg.seed, 0xA11CE), 64)
    _, stream, encoder = make_data(cfg, pipe, models.arch, torch.device("cpu"), 64, 0, 1, False)
    return models, encoder(stream.next_batch(2))


def _teacher_velocity(models, teacher, x, sigma):
    """The teacher denoiser's v at (x, σ), and (batch, guidance) of every transformer forward it made."""
    calls = []
    hook = models.teacher.register_forward_pre_hook(
        lambda m, args, kw: calls.append((kw["hidden_states"].shape[0], kw["guidance"])), with_kwargs=True)
    try:
        return teacher(x, sigma)[1], calls
    finally:
        hook.remove()


@torch.no_grad()
def test_flux_dev_teacher_is_one_forward_at_g_and_the_student_sees_the_same_g(tiny_flux_dir, tmp_path):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from lcmkit.flux import flux_denoiser
    from lcmkit.math.flow import flow_training_grid
    from lcmkit.train.distill import omega_range
    from lcmkit.train.flow_distill import make_flow_denoisers

    cfg = make_cfg(tiny_flux_dir, tmp_path / "o")
    models, (z0, cond, uncond) = _roles(cfg)
    assert models.embedded and omega_range(cfg, models.omega_preset) == (1.0, 4.0)
    omega = torch.tensor([1.5, 3.0], dtype=torch.float64)
    student, _, teacher = make_flow_denoisers(models, cond, uncond, omega)
    x, sigma = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.8, 0.3])
    v_teacher, calls = _teacher_velocity(models, teacher, x, sigma)
    assert len(calls) == 1 and calls[0][0] == 2  # one forward, no unconditional half
    torch.testing.assert_close(calls[0][1], torch.tensor([2.5, 4.0]), rtol=0, atol=0)  # g = ω + 1, as diffusers
    models.teacher.disable_adapters()
    _, v_ref = flux_denoiser(models.teacher, cond, guidance=omega + 1)(x, sigma)
    models.teacher.enable_adapters()
    assert torch.equal(v_teacher, v_ref)
    # the LoRA starts at B = 0 and the student gets the same g: at step 0 it is the guided teacher exactly
    assert torch.equal(student(x, sigma)[1], v_teacher)

    # the grid: every k-th point of the table shifted by μ of the training resolution's 16 tokens (64 px: an 8×8
    # latent in 2×2 patches); where FluxPipeline's own 1- and 2-step tables fall on it, the same σ (float32)
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    torch.testing.assert_close(models.grid.cpu(), flow_training_grid(1000, 20, mu=mu), rtol=0, atol=1e-12)
    two = models.flow.sigmas(models.pipe, 2, (8, 8))
    assert float(models.grid[-1]) == float(two[0]) == 1.0
    assert abs(float(models.grid[25]) - float(two[1])) < 1e-7


@torch.no_grad()
def test_flux_without_guidance_embedding_teacher_is_true_cfg(tiny_flux_schnell_dir, tmp_path):
    from lcmkit.flux import flux_denoiser
    from lcmkit.train.distill import omega_range
    from lcmkit.train.flow_distill import make_flow_denoisers

    cfg = make_cfg(tiny_flux_schnell_dir, tmp_path / "o")
    models, (z0, cond, uncond) = _roles(cfg)
    assert not models.embedded and omega_range(cfg, models.omega_preset) == (2.5, 6.0)
    omega = torch.tensor([3.0, 5.0], dtype=torch.float64)
    student, _, teacher = make_flow_denoisers(models, cond, uncond, omega)
    x, sigma = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.8, 0.3])
    v_teacher, calls = _teacher_velocity(models, teacher, x, sigma)
    assert calls == [(4, None)]  # one batched forward [uncond; cond], no guidance embedding
    models.teacher.disable_adapters()
    _, v_c = flux_denoiser(models.teacher, cond)(x, sigma)
    _, v_u = flux_denoiser(models.teacher, uncond)(x, sigma)
    models.teacher.enable_adapters()
    w = omega.float().reshape(2, 1, 1, 1)
    torch.testing.assert_close(v_teacher, v_u + (1 + w) * (v_c - v_u), rtol=0, atol=1e-5)
    # the student is conditional only (guidance baked in): at step 0 the unguided model
    torch.testing.assert_close(student(x, sigma)[1], v_c, rtol=0, atol=0)


def test_flux_without_guidance_embedding_distillation_lowers_the_loss(tiny_flux_schnell_dir, tmp_path):
    cfg = make_cfg(tiny_flux_schnell_dir, tmp_path / "run", max_steps=16)
    before = fixed_draw_loss(cfg, draws=6)
    result = distill(cfg)
    assert fixed_draw_loss(cfg, latest(cfg.out), draws=6) < before
    assert (result / COMFYUI_NAME).is_file() and "embedded_guidance_range" not in (result / "config.yaml").read_text()


# --------------------------------------------------------------------------------------------------------------
# resume: N steps straight == N/2, stop, resume, N/2 more (bit for bit)
# --------------------------------------------------------------------------------------------------------------

def test_flux_kill_and_resume_is_exact(tiny_flux_dir, tmp_path):
    # an EMA target of the adapter (checkpointed beside it), 2 micro-batches, cosine schedule with warm-up, Heun;
    # both result files (diffusers, comfyui) are compared too
    a, _ = assert_resume_is_exact(make_cfg, tiny_flux_dir, tmp_path, max_steps=2, lora_ema=0.5, batch_size=1,
                                  generated_samples=3, grad_accum=2, warmup_steps=1, lr_schedule="cosine",
                                  checkpoint_every=1, solver="heun")
    assert {"lora.safetensors", "lora_target.safetensors"} <= {f.name for f in a.glob("*.safetensors")}
    assert (tmp_path / "split" / "lora" / COMFYUI_NAME).is_file()


# --------------------------------------------------------------------------------------------------------------
# options that do not apply to a FLUX teacher: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--mode", "full"], "--mode full is not implemented for FLUX teachers"),
    (["--lora-format", "kohya,diffusers"], "kohya has no key names for a transformer"),
    (["--solver", "dpm-solver++"], "solver dpm-solver++ is for UNet (DDPM) teachers; this teacher takes euler, heun"),
])
def test_bad_options_for_a_flux_teacher_are_one_line(extra, message, tiny_flux_dir, tmp_path, capsys):
    from lcmkit.cli import main

    out = tmp_path / "o"
    capsys.readouterr()
    code = main(["distill", "--teacher", str(tiny_flux_dir), "--data", "world", "--out", str(out), "--max-steps", "1",
                 "--resolution", "64", "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
