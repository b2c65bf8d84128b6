"""lcmkit distill on tiny random teachers: invariants, short runs that lower the loss and save what diffusers
loads, exact resume, two processes, the non-finite guard and bad arguments.

Every run uses the built-in world as data (a fixed small batch: ``generated_samples == batch_size``) at the tiny
teachers' 64 px, LoRA rank 4 / alpha 8 (scale 2, so a lost alpha would show).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tiny
import torch
from fixed_losses import distill_loss as fixed_draw_loss

from lcmkit.errors import LcmkitError
from lcmkit.train.checkpoint import checkpoint_dirs, load_checkpoint
from lcmkit.train.config import build_config, save_config
from lcmkit.train.distill import DistillConfig, distill, make_student_unet
from lcmkit.train.logs import plot_log
from lcmkit.train.optim import lr_factor
from lcmkit.train.rng import generator_for

torch.set_num_threads(1)

TEACHERS = {"sd": "tiny_sd_dir", "sd-v": "tiny_sd_v_dir", "sdxl": "tiny_sdxl_dir"}


def make_cfg(teacher, out, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), data="world", out=str(out), lora_rank=4, lora_alpha=8.0, batch_size=4,
                generated_samples=4, max_steps=8, lr=1e-3, warmup_steps=0, validate_every=0, checkpoint_every=100,
                log_every=1, progress=False, device="cpu")
    base.update(kw)
    return build_config(DistillConfig, None, base)


def latest(out) -> Path:
    return checkpoint_dirs(out)[-1]


# --------------------------------------------------------------------------------------------------------------
# invariants
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_zero_initialised_student_equals_teacher(kind, tiny_sd_pipe, tiny_sdxl_pipe):
    from lcmkit.math.guidance import guidance_embedding

    pipe = tiny_sd_pipe if kind == "sd" else tiny_sdxl_pipe
    teacher = pipe.unet
    student = make_student_unet(teacher)
    assert student.config.time_cond_proj_dim == 256
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 499, 19])
    ctx = torch.randn(3, 16, teacher.config.cross_attention_dim, generator=g)
    extra = {}
    if kind == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(3, 32, generator=g),
                                       "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 3).float()}}
    with torch.no_grad():
        ref = teacher(x, t, ctx, **extra).sample
        for omega in (0.0, 3.7, 14.0):
            w = guidance_embedding(torch.full((3,), omega))
            assert torch.equal(student(x, t, ctx, timestep_cond=w, **extra).sample, ref)


def test_lora_ema_target_is_the_shadow_weights(tiny_sd_pipe):
    """--lora-ema: θ⁻ (the shared UNet called with the EMA weights) equals a separate copy holding those weights,
    the student's output and gradients are untouched by it, and update_ is θ⁻ ← μθ⁻ + (1 − μ)θ."""
    import copy

    from lcmkit.lora import init_lora_A_, lcm_lora_config
    from lcmkit.train.distill import EmaLoraTarget

    unet = tiny_sd_pipe.unet
    unet.add_adapter(lcm_lora_config("sd", 4, 8.0))
    init_lora_A_(unet, torch.Generator().manual_seed(0))
    online = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in online.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    shadow = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in online.items()}
    target = EmaLoraTarget(unet, shadow)
    separate = copy.deepcopy(unet)
    with torch.no_grad():
        for n, p in separate.named_parameters():
            if n in shadow:
                p.copy_(shadow[n])
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 259])
    ctx = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)

    def grads(target_model):
        unet.zero_grad(set_to_none=True)
        out = unet(x, t, ctx).sample  # the student first: its graph holds the adapter weights
        with torch.no_grad():
            ref = target_model(x, t, ctx).sample
        ((out - ref) ** 2).sum().backward()
        return ref, {n: p.grad.clone() for n, p in online.items()}

    ref_a, grad_a = grads(target)
    ref_b, grad_b = grads(separate)
    torch.testing.assert_close(ref_a, ref_b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref_a, unet(x, t, ctx).sample.detach(), atol=1e-4)  # it is not the online model
    for n in grad_a:
        torch.testing.assert_close(grad_a[n], grad_b[n], rtol=1e-4, atol=1e-6)
    before = {n: v.clone() for n, v in shadow.items()}
    target.update_(online, 0.9)
    for n, v in shadow.items():
        torch.testing.assert_close(v, 0.9 * before[n] + 0.1 * online[n].detach())


def test_top_fraction_draws():
    """p = 0 draws what the reference draws; p > 0 puts P(n = N−1) = p + (1 − p)/N and keeps ω and ε."""
    from lcmkit.train.distill import draw

    shape = (4000, 1, 1, 1)
    ref = draw(4000, shape, (5.0, 15.0), 50, generator_for(3, 0))
    same = draw(4000, shape, (5.0, 15.0), 50, generator_for(3, 0), 0.0)
    top = draw(4000, shape, (5.0, 15.0), 50, generator_for(3, 0), 0.5)
    for a, b in zip(ref, same):
        assert torch.equal(a, b)
    assert torch.equal(ref[0], top[0]) and torch.equal(ref[2], top[2])
    moved = top[1] != ref[1]
    assert bool((top[1][moved] == 49).all())
    share = float((top[1] == 49).double().mean())
    assert abs(share - (0.5 + 0.5 / 50)) < 0.03, share
    assert float((ref[1] == 49).double().mean()) < 0.05


def test_lr_schedule_is_in_optimizer_steps():
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "cosine") == 1.0
    assert lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------------------
# short runs: the loss goes down, outputs load in diffusers
# --------------------------------------------------------------------------------------------------------------

def _check_full_output(folder: Path, kind: str):
    from diffusers import (
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionXLPipeline,
    )

    cls = StableDiffusionXLPipeline if kind == "sdxl" else LatentConsistencyModelPipeline
    pipe = cls.from_pretrained(str(folder))
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.config.time_cond_proj_dim == 256
    assert (folder / "config.yaml").is_file()
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a small red circle in the center on a black background", num_inference_steps=2,
                  guidance_scale=8.0, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def _check_lora_output(folder: Path, teacher_dir: Path, checkpoint: Path, kind: str):
    """diffusers applies every trained layer, and its output equals the adapter applied directly."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from lcmkit.lora import LORA_WEIGHT_NAME, lcm_lora_config, lora_layers

    file = folder / LORA_WEIGHT_NAME
    keys = load_file(str(file)).keys()
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    trained = load_file(str(checkpoint / "lora.safetensors"))
    trained_layers = {k.split(".lora_A.")[0] for k in trained if ".lora_A." in k}

    pipe = DiffusionPipeline.from_pretrained(str(teacher_dir))
    pipe.load_lora_weights(str(folder))
    applied = lora_layers(pipe.unet)
    assert len(applied) == len(trained_layers) == len(keys) // 2
    assert set(applied) == trained_layers

    direct = DiffusionPipeline.from_pretrained(str(teacher_dir)).unet
    direct.add_adapter(lcm_lora_config("sdxl" if kind == "sdxl" else "sd", 4, 8.0))
    with torch.no_grad():
        for n, p in direct.named_parameters():
            if "lora_" in n:
                p.copy_(trained[n])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 259])
    ctx = torch.randn(2, 16, direct.config.cross_attention_dim, generator=g)
    extra = {}
    if kind == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2).float()}}
    with torch.no_grad():
        loaded, ref = pipe.unet(x, t, ctx, **extra).sample, direct(x, t, ctx, **extra).sample
        base = DiffusionPipeline.from_pretrained(str(teacher_dir)).unet(x, t, ctx, **extra).sample
    assert (loaded - ref).abs().max() < 1e-5
    assert (loaded - base).abs().max() > 1e-3  # the LoRA does something


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
def test_short_distillation_lowers_loss_and_saves(mode, kind, request, tmp_path):
    teacher = request.getfixturevalue(TEACHERS[kind])
    # a highish LR on a fixed batch of 4 (full: 3e-4, the whole UNet moves; LoRA: 1e-3)
    cfg = make_cfg(teacher, tmp_path / "run", mode=mode, ema=0.5, lr=3e-4 if mode == "full" else 1e-3)
    before = fixed_draw_loss(cfg)
    result = distill(cfg)
    after = fixed_draw_loss(cfg, latest(cfg.out))
    assert after < before, (before, after)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 8 and summary["nonfinite_skipped"] == 0
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "logs" / "log.jsonl").is_file()
    assert (tmp_path / "run" / "logs" / "loss.png").stat().st_size > 0
    assert (tmp_path / "run" / "validation" / "step-0000008.png").is_file()
    if mode == "full":
        assert result.name == "pipeline"
        _check_full_output(result, kind)
    else:
        assert result.name == "lora"
        _check_lora_output(result, teacher, latest(cfg.out), kind)


# --------------------------------------------------------------------------------------------------------------
# resume: N steps straight == N/2, stop, resume, N/2 more (bit for bit)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "lora", "lora-ema"])
def test_kill_and_resume_is_exact(mode, tiny_sd_dir, tmp_path):
    from safetensors.torch import load_file

    # batch 2 of 5 samples, 2 micro-batches: every step crosses data epochs; cosine schedule with warm-up
    extra = {"lora_ema": 0.5} if mode == "lora-ema" else {}
    mode = mode.split("-")[0]
    kw = dict(mode=mode, max_steps=4, **extra, batch_size=2, generated_samples=5, grad_accum=2, ema=0.9, warmup_steps=1,
              lr_schedule="cosine", checkpoint_every=1, cache_latents=(mode == "full"))
    distill(make_cfg(tiny_sd_dir, tmp_path / "straight", **kw))
    distill(make_cfg(tiny_sd_dir, tmp_path / "split", stop_at=2, **kw))
    assert not (tmp_path / "split" / "summary.json").read_text().count('"finished": true')
    distill(make_cfg(tiny_sd_dir, tmp_path / "split", resume=True, **kw))

    a, b = (latest(tmp_path / d) for d in ("straight", "split"))
    assert a.name == b.name == "step-0000004"
    for f in sorted(a.glob("*.safetensors")):
        wa, wb = load_file(str(f)), load_file(str(b / f.name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (f.name, k)
    sa, sb = (load_checkpoint(x)[1] for x in (a, b))
    assert torch.equal(sa["data"]["position"], sb["data"]["position"])
    assert sa["lr_scheduler"]["last_epoch"] == sb["lr_scheduler"]["last_epoch"] == 4
    la = json.loads((tmp_path / "straight" / "summary.json").read_text())["losses"]
    lb = json.loads((tmp_path / "split" / "summary.json").read_text())["losses"]
    assert la[2:] == lb  # the resumed half reproduces the straight run's losses exactly
    if extra:  # --lora-ema: θ⁻ is checkpointed beside θ, differs from it, and is what the LoRA file holds
        online, ema = load_file(str(a / "lora.safetensors")), load_file(str(a / "lora_target.safetensors"))
        assert online.keys() == ema.keys() and any(not torch.equal(online[k], ema[k]) for k in ema)
        exported = load_file(str(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors"))
        assert len(exported) == len(ema)
        assert all(torch.equal(exported["unet." + k.replace(".default", "")], v) for k, v in ema.items())


# --------------------------------------------------------------------------------------------------------------
# two processes (torchrun, gloo on CPU)
# --------------------------------------------------------------------------------------------------------------

def test_two_processes_torchrun(tiny_sd_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = tiny.torchrun_lcmkit(
        ["distill", "--teacher", str(tiny_sd_dir), "--data", "world", "--out", str(out), "--mode", "lora",
         "--lora-rank", "4", "--lora-alpha", "8", "--batch-size", "2", "--generated-samples", "8", "--max-steps", "2",
         "--warmup-steps", "4", "--log-every", "1", "--validate-every", "0", "--no-progress", "--device", "cpu"],
        port=29400 + os.getpid() % 500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["ranks_consistent"] and summary["finished"]
    assert proc.stdout.strip().splitlines() == [str(out / "lora")]  # one result line, not one per process
    # the schedule is in optimizer steps, not stretched by the 2 processes: warm-up over 4 steps gives the
    # first two steps lr/4 and lr/2 (a scheduler stepped once per process would give lr/4, 3·lr/4)
    lrs = [json.loads(line)["lr"] for line in (out / "logs" / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-4 / 4, 1e-4 / 2])  # default lr 1e-4
    _ = load_checkpoint(latest(out))  # weights_only loads


# --------------------------------------------------------------------------------------------------------------
# non-finite guard
# --------------------------------------------------------------------------------------------------------------

def _nan_on(monkeypatch, bad_calls: set[int]):
    import lcmkit.train.distill as mod

    real, calls = mod.lcd_loss, [0]

    def lcd_loss(*args, **kw):
        loss, terms = real(*args, **kw)
        calls[0] += 1
        return (loss * float("nan") if calls[0] in bad_calls else loss), terms

    monkeypatch.setattr(mod, "lcd_loss", lcd_loss)


def test_nan_step_is_skipped_and_counted(monkeypatch, tiny_sd_dir, tmp_path):
    _nan_on(monkeypatch, {2})
    cfg = make_cfg(tiny_sd_dir, tmp_path / "nan", mode="lora", max_steps=4)
    distill(cfg)
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["finished"] and summary["nonfinite_skipped"] == 1
    weights, _ = load_checkpoint(latest(cfg.out))
    assert all(bool(torch.isfinite(v).all()) for v in weights["lora"].values())


def test_too_many_nonfinite_steps_stop_the_run(monkeypatch, tiny_sd_dir, tmp_path):
    _nan_on(monkeypatch, set(range(3, 100)))
    cfg = make_cfg(tiny_sd_dir, tmp_path / "nan", mode="full", max_steps=8, max_nonfinite=3, checkpoint_every=2)
    with pytest.raises(LcmkitError, match="non-finite loss.*fp16 overflow.*learning rate too high"):
        distill(cfg)
    assert not (tmp_path / "nan" / "pipeline").exists()
    ckpt = latest(cfg.out)
    assert ckpt.name == "step-0000004"  # written before the 3rd bad step in a row (step 5) stopped the run
    weights, _ = load_checkpoint(ckpt)
    assert all(bool(torch.isfinite(v).all()) for v in weights["student"].values())


# --------------------------------------------------------------------------------------------------------------
# bad arguments: one line, exit 2
# --------------------------------------------------------------------------------------------------------------

def _cli(args, capsys) -> tuple[int, str]:
    from lcmkit.cli import main

    code = main(["distill", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--omega-min", "9", "--omega-max", "3"], "omega_min 9.0 > omega_max 3.0"),
    (["--skip", "0"], "skip k must be >= 1"),
    (["--omega", "4", "--omega-min", "1"], "either a fixed --omega"),
    (["--ema", "1.5"], "ema must be in [0, 1)"),
    (["--top-fraction", "1"], "top_fraction must be in [0, 1)"),
    (["--mode", "lora", "--cache-latents", "true", "--crop", "random"], "cache_latents needs crop=center"),
])
def test_bad_arguments(extra, message, tiny_sd_dir, tmp_path, capsys):
    code, err = _cli(["--teacher", str(tiny_sd_dir), "--data", "world", "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_world_open_data_names_subsets_per_sample(tiny_sd_dir, tmp_path, capsys):
    from lcmkit.train.data import DataSource
    from lcmkit_world import world

    cfg = make_cfg(tiny_sd_dir, tmp_path / "o", data="world:open", generated_samples=64)
    source = DataSource(cfg, 32)
    captions = [source.load(i)[1] for i in range(64)]
    named = [world.parse_open_caption(c) for c in captions]
    assert captions == [source.load(i)[1] for i in range(64)]  # sample i's caption depends only on (seed, i)
    assert 8 < sum(len(n) < 5 for n in named) < 64 and all("shape" in n for n in named)
    assert len(source.captions()) == 540 * 16 and set(captions) <= set(source.captions())
    exact = DataSource(make_cfg(tiny_sd_dir, tmp_path / "p", data="world", generated_samples=4), 32)
    assert [world.parse_caption(exact.load(i)[1]) for i in range(4)]  # exact captions, all five named
    code, err = _cli(["--teacher", str(tiny_sd_dir), "--data", "world:open:open", "--out", str(tmp_path / "q")],
                     capsys)
    assert code == 2 and "unknown world style" in err and len(err.splitlines()) == 1


def test_bad_teacher_and_output(tiny_sd_dir, tmp_path, capsys):
    code, err = _cli(["--teacher", str(tmp_path / "nope"), "--data", "world", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "teacher folder" in err and "not found" in err
    (tmp_path / "empty").mkdir()
    code, err = _cli(["--teacher", str(tmp_path / "empty"), "--data", "world", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a diffusers pipeline folder" in err
    code, err = _cli(["--teacher", str(tiny_sd_dir), "--data", str(tmp_path / "nodata"), "--out", "x"], capsys)
    assert code == 2 and "data" in err and "not found" in err
    (tmp_path / "used" / "checkpoints").mkdir(parents=True)
    code, err = _cli(["--teacher", str(tiny_sd_dir), "--data", "world", "--out", str(tmp_path / "used")], capsys)
    assert code == 2 and "already has results" in err and "--resume" in err
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("teacher: x\nlearning_rate: 1\n")
    code, err = _cli(["--config", str(cfg_file), "--data", "world", "--out", "x"], capsys)
    assert code == 2 and "unknown option 'learning_rate'" in err


def test_yaml_config_and_cli_override(tiny_sd_dir, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"teacher: {tiny_sd_dir}\ndata: world\nout: {tmp_path}/o\nskip: 10\n"
                        "optim:\n  lr: 0.002\n  warmup_steps: 7\nomega-min: 2\n")
    cfg = build_config(DistillConfig, cfg_file, {"skip": 40, "warmup_steps": None})
    assert (cfg.skip, cfg.optim.lr, cfg.optim.warmup_steps, cfg.omega_min) == (40, 0.002, 7, 2)


def test_saved_config_is_accepted_back(tiny_sd_dir, tmp_path):
    """The config.yaml a run saves (with its ``resolved:`` record) is a valid ``--config`` for a resume or a rerun."""
    cfg = build_config(DistillConfig, None, {"teacher": str(tiny_sd_dir), "data": "world",
                                                     "out": str(tmp_path / "o"), "skip": 10, "lr": 3e-4})
    saved = save_config(cfg, tmp_path, {"architecture": "sd", "num_grid_points": 50})
    assert "resolved:" in saved.read_text()
    again = build_config(DistillConfig, saved, {"max_steps": 5})
    assert (again.skip, again.optim.lr, again.max_steps, again.teacher) == (10, 3e-4, 5, str(tiny_sd_dir))


def test_loss_plot_counts_a_resumed_step_once_and_skips_a_cut_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) for s in (10, 20, 30)]
    lines += ['{"step": 40, "lo', json.dumps({"step": 30, "loss": 0.5, "lr": 1e-3}), json.dumps({"step": 40, "x": 1})]
    log.write_text("\n".join(lines) + "\n")
    assert plot_log(log, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").stat().st_size > 0
    log.write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    assert plot_log(log, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
