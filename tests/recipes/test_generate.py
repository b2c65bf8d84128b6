"""lcmkit.pipelines.generate and ``lcmkit generate`` against diffusers' own pipelines, on tiny random models.

Reference equivalence: same seed → same image as diffusers (LCM text2img and img2img, SD + LCMScheduler with
CFG and a negative prompt, TCD, DDIM and DPM-Solver(++) teachers, SDXL). Invariants: image i of a batch equals the
single image at seed S + i; a LoRA at weight 0 is the base model and is removed afterwards; LoRAs fused into the
weights (the default) give the hooks' images and are undone bit for bit. CLI: bad input exits non-zero with one line
on stderr; ``--no-fuse-loras`` picks the hooks.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tiny
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LatentConsistencyModelImg2ImgPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
)
from PIL import Image

from lcmkit.cli import main
from lcmkit.errors import LcmkitError
from lcmkit.lora_formats import pipeline_models, save_lora
from lcmkit.pipelines import generate, generate_batches, load_pipeline, parse_lora

torch.set_num_threads(1)

PROMPT = "a red circle on a blue square"
TOL = 1 / 255  # the brief's bar; measured differences are ~1e-6


def _gen(pipe, **kw):
    kw = dict(dict(steps=2, guidance=1.0, seed=3, height=64, width=64, progress=False, output_type="np"), **kw)
    return generate(pipe, PROMPT, **kw)


def _ref(pipe, seed=3, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", height=64, width=64,
                **kw).images


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _init_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))


# --- same seed, same image ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_matches_diffusers(tiny_lcm_pipe, steps):
    ref = _ref(tiny_lcm_pipe, num_inference_steps=steps, guidance_scale=8.5)
    ours = _gen(tiny_lcm_pipe, steps=steps, guidance=8.5)
    assert ref.std() > 0.05  # not a saturated/flat image: the comparison means something
    assert _maxdiff(ours, ref) <= 1e-4
    # the PIL path (8-bit rounding) stays within one grey level
    pil = generate(tiny_lcm_pipe, PROMPT, steps=steps, guidance=8.5, seed=3, height=64, width=64, progress=False)
    assert _maxdiff(np.asarray(pil[0]) / 255, ref[0]) <= TOL


@pytest.mark.parametrize("steps,strength", [(2, 0.5), (4, 0.8)])
def test_lcm_img2img_matches_diffusers(tiny_lcm_pipe, steps, strength):
    ref_pipe = LatentConsistencyModelImg2ImgPipeline(**tiny_lcm_pipe.components)
    ref = _ref(ref_pipe, image=_init_image(), num_inference_steps=steps, strength=strength, guidance_scale=8.5)
    ours = _gen(tiny_lcm_pipe, steps=steps, guidance=8.5, init_image=_init_image(), strength=strength)
    assert _maxdiff(ours, ref) <= 1e-4


def test_image_i_equals_single_image_at_seed_plus_i(tiny_lcm_pipe):
    batch = _gen(tiny_lcm_pipe, num_images=3, seed=10, guidance=4.0)
    for i in range(3):
        single = _gen(tiny_lcm_pipe, num_images=1, seed=10 + i, guidance=4.0)
        assert _maxdiff(batch[i], single[0]) <= 1e-5
    assert _maxdiff(batch[0], batch[1]) > 0.01


def test_sd_with_lcm_scheduler_cfg_and_negative_prompt_matches_diffusers(tiny_sd_pipe):
    """LCM-LoRA style: a base SD UNet driven by LCM sampling, real CFG at guidance > 1, negative prompt honoured."""
    ref_pipe = StableDiffusionPipeline(**dict(tiny_sd_pipe.components,
                                              scheduler=LCMScheduler.from_config(tiny_sd_pipe.scheduler.config)))
    ref = _ref(ref_pipe, num_inference_steps=2, guidance_scale=2.0, negative_prompt="green")
    ours = _gen(tiny_sd_pipe, steps=2, guidance=2.0, negative_prompt="green")
    assert _maxdiff(ours, ref) <= 1e-4
    assert _maxdiff(ours, _gen(tiny_sd_pipe, steps=2, guidance=2.0)) > 1e-3  # the negative prompt matters


def test_ddim_teacher_matches_diffusers(tiny_sd_pipe):
    ref_pipe = StableDiffusionPipeline(**dict(tiny_sd_pipe.components,
                                              scheduler=DDIMScheduler.from_config(tiny_sd_pipe.scheduler.config)))
    ref = _ref(ref_pipe, num_inference_steps=3, guidance_scale=7.5, negative_prompt="green")
    ours = _gen(tiny_sd_pipe, steps=3, guidance=7.5, negative_prompt="green", sampler="ddim")
    assert _maxdiff(ours, ref) <= 1e-4


@pytest.mark.parametrize("sampler,algorithm", [("dpm-solver", "dpmsolver"), ("dpm-solver++", "dpmsolver++")])
def test_dpm_solver_teachers_on_v_prediction_match_diffusers(tiny_sd_v_pipe, sampler, algorithm):
    """The denoiser hands ε̂ to a scheduler set to epsilon: must equal diffusers driving the v model directly."""
    extra = {"final_sigmas_type": "sigma_min"} if algorithm == "dpmsolver" else {}  # diffusers refuses "zero" there
    scheduler = DPMSolverMultistepScheduler.from_config(tiny_sd_v_pipe.scheduler.config, algorithm_type=algorithm,
                                                        solver_order=2, **extra)
    ref_pipe = StableDiffusionPipeline(**dict(tiny_sd_v_pipe.components, scheduler=scheduler))
    ref = _ref(ref_pipe, num_inference_steps=4, guidance_scale=3.0)
    ours = _gen(tiny_sd_v_pipe, steps=4, guidance=3.0, sampler=sampler)
    assert _maxdiff(ours, ref) <= 1e-4


def test_sdxl_generates_and_matches_diffusers(tiny_sdxl_pipe):
    for guidance in (1.0, 3.0):  # conditional only; CFG with SDXL's all-zero unconditional
        ref_pipe = StableDiffusionXLPipeline(**dict(tiny_sdxl_pipe.components,
                                                    scheduler=LCMScheduler.from_config(tiny_sdxl_pipe.scheduler.config)))
        ref = _ref(ref_pipe, num_inference_steps=2, guidance_scale=guidance)
        ours = _gen(tiny_sdxl_pipe, steps=2, guidance=guidance)
        assert ours.shape == (1, 64, 64, 3)
        assert _maxdiff(ours, ref) <= 1e-4


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_tcd_matches_diffusers(tiny_sd_pipe, eta):
    ref_pipe = StableDiffusionPipeline(**dict(tiny_sd_pipe.components,
                                              scheduler=TCDScheduler.from_config(tiny_sd_pipe.scheduler.config)))
    ref = _ref(ref_pipe, num_inference_steps=4, guidance_scale=1.0, eta=eta)
    assert _maxdiff(_gen(tiny_sd_pipe, steps=4, sampler="tcd", eta=eta), ref) <= 1e-4


# --- negative prompt: honoured or refused, never ignored -----------------------------------------------------------

def test_negative_prompt_refused_for_full_lcm(tiny_lcm_pipe):
    with pytest.raises(LcmkitError, match="negative prompt"):
        _gen(tiny_lcm_pipe, guidance=8.0, negative_prompt="blurry")


def test_negative_prompt_refused_without_cfg(tiny_sd_pipe):
    with pytest.raises(LcmkitError, match="guidance > 1"):
        _gen(tiny_sd_pipe, guidance=1.0, negative_prompt="blurry")


# --- LoRA on the fly -----------------------------------------------------------------------------------------------

def test_lora_changes_output_weight_zero_is_base_and_is_removed(tiny_sd_pipe, tmp_path):
    a = tiny.tiny_lora_file(tiny_sd_pipe.unet, tmp_path / "a.safetensors", seed=1)
    b = tiny.tiny_lora_file(tiny_sd_pipe.unet, tmp_path / "b.safetensors", seed=2)
    base = _gen(tiny_sd_pipe)
    with_a = _gen(tiny_sd_pipe, loras=[f"{a}:1.0"])
    assert _maxdiff(with_a, base) > 1e-3
    assert _maxdiff(_gen(tiny_sd_pipe, loras=[f"{a}:0"]), base) <= 1e-6
    both = _gen(tiny_sd_pipe, loras=[f"{a}:1.0", (b, 0.5)])
    assert _maxdiff(both, with_a) > 1e-4
    assert _maxdiff(_gen(tiny_sd_pipe), base) <= 1e-6  # adapters were deleted afterwards


def _params(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": p.detach().clone() for c, m in pipeline_models(pipe).items() for k, p in m.named_parameters()}


def _changed(pipe, before) -> list[str]:
    return [k for k, p in _params(pipe).items() if not torch.equal(p, before[k])]


def _hooks(pipe) -> int:
    return sum(len(m._forward_hooks) for model in pipeline_models(pipe).values() for m in model.modules())


def test_fused_loras_give_the_hooks_images_and_are_undone_bit_for_bit(tiny_sd_pipe, tmp_path):
    from test_lora_formats import random_lora

    models = pipeline_models(tiny_sd_pipe)
    style = save_lora(random_lora(models, seed=10), tmp_path / "style.safetensors", "kohya")  # UNet + text encoder
    lcm = save_lora(random_lora(models, seed=11, text=False), tmp_path / "lcm.safetensors", "peft")
    loras = [f"{style}:0.8", (lcm, 1.0)]
    before = _params(tiny_sd_pipe)
    base = _gen(tiny_sd_pipe)
    fused = _gen(tiny_sd_pipe, loras=loras)
    assert _changed(tiny_sd_pipe, before) == []
    hooked = _gen(tiny_sd_pipe, loras=loras, fuse_loras=False)
    assert _maxdiff(fused, base) > 1e-2
    assert _maxdiff(fused, hooked) <= 1e-5  # float32 rounding only
    for fuse in (True, False):  # while sampling: merged weights and no hooks, or hooks and the base weights
        batches = generate_batches(tiny_sd_pipe, PROMPT, steps=1, height=64, width=64, num_images=2, batch_size=1,
                                   progress=False, output_type="np", loras=loras, fuse_loras=fuse)
        next(batches)
        assert (bool(_changed(tiny_sd_pipe, before)), _hooks(tiny_sd_pipe) > 0) == (fuse, not fuse)
        batches.close()  # a caller that stops early: weights restored, hooks removed
        assert _changed(tiny_sd_pipe, before) == [] and _hooks(tiny_sd_pipe) == 0
    assert _maxdiff(_gen(tiny_sd_pipe), base) == 0


def test_float16_lcm_images_follow_float32_and_loras_change_them(tiny_sd_pipe, tmp_path):
    # fp16 once sampled the zero latent whatever the model (c_skip = c_out = 0 from an fp16 overflow), so a
    # LoRA, fused or hooked, left the image exactly as it was
    lora = tiny.tiny_lora_file(tiny_sd_pipe.unet, tmp_path / "a.safetensors", seed=1)
    base32, lora32 = _gen(tiny_sd_pipe), _gen(tiny_sd_pipe, loras=[lora])
    base16 = _gen(tiny_sd_pipe, dtype="float16", device="cpu")
    fused16 = _gen(tiny_sd_pipe, dtype="float16", device="cpu", loras=[lora])
    hooked16 = _gen(tiny_sd_pipe, dtype="float16", device="cpu", loras=[lora], fuse_loras=False)
    assert _maxdiff(base16, base32) <= 0.01 and _maxdiff(fused16, lora32) <= 0.01
    assert _maxdiff(fused16, base16) > 0.05 and _maxdiff(fused16, hooked16) <= 0.01


def test_parse_lora():
    assert parse_lora("x/y.safetensors") == (parse_lora("x/y.safetensors:1")[0], 1.0)
    assert parse_lora("x/y.safetensors:0.8")[1] == 0.8


# --- loading -------------------------------------------------------------------------------------------------------

def test_load_folder_and_refusals(tiny_lcm_dir, tmp_path, monkeypatch):
    pipe = load_pipeline(tiny_lcm_dir, device="cpu")
    assert type(pipe).__name__ == "LatentConsistencyModelPipeline"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LcmkitError, match="local"):
        load_pipeline("someorg/some-model")
    with pytest.raises(LcmkitError, match="not a diffusers pipeline"):
        load_pipeline(tmp_path)


# --- CLI -----------------------------------------------------------------------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_writes_images_and_grid(tiny_lcm_dir, tmp_path, capsys):
    rc, out, err = _cli(capsys, tiny_lcm_dir, "--prompt", PROMPT, "--steps", 2, "--guidance", 4, "--seed", 1,
                        "--height", 64, "--width", 64, "--out", tmp_path / "img.png", "--num-images", 2)
    assert rc == 0, err
    for name in ("img-0.png", "img-1.png", "img-grid.png"):
        assert (tmp_path / name).is_file() and name in out
    assert Image.open(tmp_path / "img-grid.png").size == (128, 64)
    # results already there: refused without --overwrite, replaced with it
    again = ("--prompt", PROMPT, "--steps", 1, "--guidance", 4, "--height", 64, "--width", 64,
             "--out", tmp_path / "img.png", "--num-images", 2)
    rc, _, err = _cli(capsys, tiny_lcm_dir, *again)
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, tiny_lcm_dir, *again, "--overwrite")
    assert rc == 0, err


def test_cli_fuses_loras_unless_no_fuse_loras(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    import lcmkit.task_arithmetic as ta

    calls = []  # apply_loras checks the files once (cached), then fuses or attaches without a second check
    for name in ("_fuse_checked", "_attach_checked"):
        monkeypatch.setattr(ta, name, lambda *a, _f=getattr(ta, name), _n=name: calls.append(_n) or _f(*a))
    lora = tiny.tiny_lora_file(tiny.tiny_sd().unet, tmp_path / "l.safetensors", seed=1)
    images = {}
    for flags in ([], ["--lora", f"{lora}:0.8"], ["--lora", f"{lora}:0.8", "--no-fuse-loras"]):
        calls.clear()
        out = tmp_path / f"{len(flags)}.png"
        rc, _, err = _cli(capsys, tiny_sd_dir, "--prompt", PROMPT, "--steps", 2, "--height", 64, "--width", 64,
                          "--out", out, *flags)
        assert rc == 0, err
        assert calls == (["_attach_checked"] if "--no-fuse-loras" in flags else ["_fuse_checked"])
        images[len(flags)] = np.asarray(Image.open(out), dtype=np.float64)
    assert np.abs(images[2] - images[0]).max() >= 8  # the LoRA shows in the PNG
    assert np.abs(images[2] - images[3]).max() <= 1  # fused or hooked: the same image up to 8-bit rounding


def _bad_cases(lcm_dir, tmp):
    (tmp / "notapipe").mkdir(exist_ok=True)
    (tmp / "l.pt").write_bytes(b"0")
    init = tmp / "init.png"
    _init_image().save(init)
    out = tmp / "o.png"
    return {
        "steps<=0": [lcm_dir, "--steps", 0, "--out", out],
        "steps beyond grid": [lcm_dir, "--steps", 60, "--out", out],
        "strength>1": [lcm_dir, "--init-image", init, "--strength", 1.5, "--out", out],
        "strength=0": [lcm_dir, "--init-image", init, "--strength", 0, "--out", out],
        "strength too small for steps": [lcm_dir, "--init-image", init, "--strength", 0.05, "--out", out],
        "missing model": [tmp / "nope", "--out", out],
        "not a pipeline": [tmp / "notapipe", "--out", out],
        "missing lora": [lcm_dir, "--lora", tmp / "missing.safetensors", "--out", out],
        "lora not safetensors": [lcm_dir, "--lora", tmp / "l.pt", "--out", out],
        "out folder missing": [lcm_dir, "--out", tmp / "no" / "o.png"],
        "negative prompt on full LCM": [lcm_dir, "--negative-prompt", "x", "--guidance", 8, "--out", out],
    }


def test_cli_bad_inputs_one_line(tiny_lcm_dir, tmp_path, capsys):
    for case, argv in _bad_cases(tiny_lcm_dir, tmp_path).items():
        rc, _, err = _cli(capsys, *argv[:1], "--prompt", "p", "--height", 64, "--width", 64, *argv[1:])
        assert rc != 0, case
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, err)
        assert "internal error" not in err, (case, err)  # a clear LcmkitError, not an unexpected exception
    assert not (tmp_path / "o.png").exists()


def test_cli_subprocess_bad_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcmkit.cli", "generate", str(tmp_path / "missing"), "--prompt", "p",
                           "--out", str(tmp_path / "o.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "not found" in proc.stderr


def test_prompt_list_batches_and_image_i_depends_only_on_prompt_i_and_seed(tiny_sd_pipe):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    kw = dict(steps=2, guidance=2.0, seed=40, sampler="lcm", output_type="np", progress=False)
    batch = generate(tiny_sd_pipe, prompts, **kw)
    assert batch.shape[0] == 3
    for i, p in enumerate(prompts):
        alone = generate(tiny_sd_pipe, p, **{**kw, "seed": 40 + i})
        np.testing.assert_allclose(batch[i:i + 1], alone, atol=1e-5)
    assert not np.allclose(batch[0], batch[1])
    with pytest.raises(LcmkitError):
        generate(tiny_sd_pipe, prompts, num_images=2, **kw)


def test_teacher_ddim_never_clips_latents(tiny_sd_pipe):
    """A folder whose scheduler config does not mention clip_sample (e.g. a DPM-Solver config) must not get
    DDIM's pixel-space default clip_sample=True: scaled latents are not in [-1, 1]."""
    from diffusers import DPMSolverMultistepScheduler

    from lcmkit.pipelines import teacher_scheduler
    config = {k: v for k, v in tiny_sd_pipe.scheduler.config.items() if k not in ("clip_sample", "set_alpha_to_one")}
    tiny_sd_pipe.scheduler = DPMSolverMultistepScheduler.from_config(config)
    assert DDIMScheduler.from_config(tiny_sd_pipe.scheduler.config).config.clip_sample  # the trap
    ddim = teacher_scheduler(tiny_sd_pipe, "ddim")
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
