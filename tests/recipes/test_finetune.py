"""lcmkit finetune (LCF, LCM paper Algorithm 4) and lcmkit lora train (style LoRA) on tiny random models: the
recipe feeds lcf_loss the right pairs, short runs lower a fixed-draw loss and save what loads as the input did,
the diffusion target follows prediction_type, exact resume, LoRA adapters round-trip every format, bad arguments.

Every run trains on the built-in world's outlined style (the "custom dataset" the teacher never saw), a fixed small
batch (``generated_samples == batch_size``), at the tiny models' 64 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
from fixed_losses import finetune_loss as lcf_fixed_loss
from fixed_losses import style_loss as style_fixed_loss

from lcmkit.train.checkpoint import checkpoint_dirs, load_checkpoint
from lcmkit.train.config import build_config
from lcmkit.train.finetune import FinetuneConfig, finetune
from lcmkit.train.rng import generator_for
from lcmkit.train.style_lora import StyleLoraConfig, train_style_lora

torch.set_num_threads(1)

RUN = dict(data="world:outlined", batch_size=4, generated_samples=4, max_steps=6, lr=1e-3, warmup_steps=0,
           validate_every=0, checkpoint_every=100, log_every=1, progress=False, device="cpu")


def lcf_cfg(model, out, **kw) -> FinetuneConfig:
    return build_config(FinetuneConfig, None, {**RUN, "model": str(model), "out": str(out), **kw})


def style_cfg(model, out, **kw) -> StyleLoraConfig:
    base = {**RUN, "model": str(model), "out": str(out), "lora_rank": 4, "lora_alpha": 8.0, "validation_steps": 3}
    return build_config(StyleLoraConfig, None, {**base, **kw})


def latest(folder) -> Path:
    return checkpoint_dirs(folder)[-1]


@pytest.fixture(scope="module")
def lcm_lora_file(tmp_path_factory):
    """A stand-in LCM-LoRA for the tiny SD (attention layers, rank 4, alpha 4, B != 0), diffusers format."""
    return tiny.tiny_lora_file(tiny.tiny_sd().unet, tmp_path_factory.mktemp("lcm_lora") / "lcm_lora.safetensors")


def _unet_outputs_differ(a, b, ctx_dim=32, w=False):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 259])
    ctx = torch.randn(2, 16, ctx_dim, generator=g)
    extra = {"timestep_cond": torch.randn(2, 256, generator=g)} if w else {}
    with torch.no_grad():
        return (a(x, t, ctx, **extra).sample - b(x, t, ctx, **extra).sample).abs().max()


# --------------------------------------------------------------------------------------------------------------
# LoRA adapters: a file's layers as peft adapters, and back, in every format
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_lora_adapters_round_trip_every_format(fmt, tmp_path):
    from lcmkit.lora import adapter_weights, load_into_adapters
    from lcmkit.lora_formats import LoraLayer, load_lora, save_lora
    from lcmkit.task_arithmetic import attach_loras
    from lcmkit.train.finetune import lora_file_format

    unet = tiny.tiny_unet()
    weights = load_lora(tiny.tiny_lora_file(unet, tmp_path / "l.safetensors"), unet)
    # one layer with its own rank and alpha: patterns must keep per-layer ranks and scales
    name = sorted(weights)[0]
    g = torch.Generator().manual_seed(3)
    d, u = weights[name].down, weights[name].up
    weights[name] = LoraLayer(torch.randn(2, d.shape[1], generator=g), torch.randn(u.shape[0], 2, generator=g), 5.0)
    path = save_lora(weights, tmp_path / f"in-{fmt}.safetensors", fmt)
    assert lora_file_format(path) == fmt

    adapted = tiny.tiny_unet()
    load_into_adapters(adapted, load_lora(path, adapted))
    hooked = tiny.tiny_unet()
    with attach_loras({"unet": hooked}, [(weights, 1.0)]):
        assert _unet_outputs_differ(adapted, hooked) < 1e-5  # peft adapter == the file's W + (α/r)·up@down
    back = adapter_weights(adapted)
    assert back.keys() == weights.keys()
    for k in weights:
        assert back[k].alpha == weights[k].alpha and back[k].rank == weights[k].rank
        assert torch.equal(back[k].down, weights[k].down) and torch.equal(back[k].up, weights[k].up)


# --------------------------------------------------------------------------------------------------------------
# the recipe feeds lcf_loss the right pairs
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "lora"])
def test_first_lcf_step_equals_lcf_loss_by_hand(mode, tiny_lcm_dir, tiny_sd_dir, lcm_lora_file, tmp_path):
    """The loss of step 1 (before any update) == lcf_loss on hand-built inputs: the VAE posterior mean of the
    batch, its captions' embeddings, the draws (ω, n, ε) of (seed, step 0, micro 0, rank 0), θ = θ⁻ = the input
    model (LoRA: the file applied by forward hooks, not by peft)."""
    from lcmkit.denoisers import unet_denoiser
    from lcmkit.losses import lcf_loss
    from lcmkit.math.schedule import alphas_cumprod_from_config
    from lcmkit.pipelines import encode_prompt_sd, load_pipeline
    from lcmkit.task_arithmetic import apply_loras
    from lcmkit.train.data import DataSource, DataStream
    from lcmkit.train.distill import draw

    kw = dict(batch_size=3, generated_samples=5, max_steps=1, loss="l2", skip=100, seed=7)
    if mode == "full":
        cfg = lcf_cfg(tiny_lcm_dir, tmp_path / "run", omega_min=2.0, omega_max=9.0, **kw)
    else:
        cfg = lcf_cfg(tiny_sd_dir, tmp_path / "run", lora=str(lcm_lora_file), **kw)
    finetune(cfg)
    logged = json.loads((tmp_path / "run" / "summary.json").read_text())["losses"][0]

    pipe = load_pipeline(cfg.model, device="cpu")
    samples = DataStream(DataSource(cfg, 64), cfg, 64, 0, 1).next_batch(3)
    with torch.no_grad():
        z0 = pipe.vae.encode(torch.stack([s.pixels for s in samples])).latent_dist.mean * pipe.vae.config.scaling_factor
        cond = encode_prompt_sd(pipe, [s.caption for s in samples])
    omega, index, noise = draw(3, tuple(z0.shape), (2.0, 9.0), 1000 // 100, generator_for(7, 0, 0, 0))
    ac = alphas_cumprod_from_config(pipe.scheduler.config)
    w = omega if mode == "full" else None
    model = unet_denoiser(pipe.unet, ac, cond, prediction_type="epsilon", w_omega=w)
    with torch.no_grad(), apply_loras(pipe, [(lcm_lora_file, 1.0)] if mode == "lora" else []):
        by_hand, terms = lcf_loss(model, model, z0, noise, index, ac, skip=100, loss_type="l2")
    assert logged == pytest.approx(float(by_hand), rel=1e-5, abs=1e-7)
    assert terms["t_n_plus_k"].tolist() == [(int(n) + 1) * 100 - 1 for n in index]


# --------------------------------------------------------------------------------------------------------------
# short LCF runs: the loss goes down, the output loads as the input did
# --------------------------------------------------------------------------------------------------------------

def test_lcf_full_lcm_lowers_loss_and_saves_an_lcm_pipeline(tiny_lcm_dir, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler
    from safetensors.torch import load_file

    cfg = lcf_cfg(tiny_lcm_dir, tmp_path / "run", ema=0.5, lr=3e-4)
    before = lcf_fixed_loss(cfg)
    result = finetune(cfg)
    after = lcf_fixed_loss(cfg, latest(cfg.out))
    assert after < before, (before, after)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 6 and summary["nonfinite_skipped"] == 0
    assert (tmp_path / "run" / "validation" / "step-0000006.png").is_file()
    assert (tmp_path / "run" / "logs" / "log.jsonl").is_file() and (result / "config.yaml").is_file()

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(result))
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
    target = load_file(str(latest(cfg.out) / "target.safetensors"))  # the saved UNet is θ⁻
    assert all(torch.equal(v, target[k]) for k, v in pipe.unet.state_dict().items())
    assert _unet_outputs_differ(pipe.unet, tiny.tiny_lcm().unet, w=True) > 0  # it did train
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a small red circle in the center on a black background", num_inference_steps=2,
                  guidance_scale=8.0, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_lcf_lcm_lora_lowers_loss_and_saves_a_lora_file(tiny_sd_dir, lcm_lora_file, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    from lcmkit.lora import lora_layers
    from lcmkit.lora_formats import load_lora
    from lcmkit.pipelines import generate

    cfg = lcf_cfg(tiny_sd_dir, tmp_path / "run", lora=str(lcm_lora_file), lr=1e-2)
    before = lcf_fixed_loss(cfg)
    result = finetune(cfg)
    after = lcf_fixed_loss(cfg, latest(cfg.out))
    assert after < before, (before, after)
    assert result == tmp_path / "run" / "lora" / lcm_lora_file.name

    base = DiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    original, tuned = load_lora(lcm_lora_file, base.unet), load_lora(result, base.unet)
    assert tuned.keys() == original.keys()  # same layers, ranks and alphas; new weights
    assert all(tuned[k].alpha == original[k].alpha and tuned[k].rank == original[k].rank for k in tuned)
    assert any(not torch.equal(tuned[k].up, original[k].up) for k in tuned)

    # LCM-LoRA as diffusers documents it: the base pipeline with an LCMScheduler and the LoRA loaded
    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(result.parent), weight_name=result.name)
    assert len(lora_layers(pipe.unet)) == len(tuned)  # every layer applied
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a small red circle", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    ours = generate(str(tiny_sd_dir), "a small red circle", steps=2, loras=[str(result)], device="cpu",
                    progress=False, output_type="np")
    assert ours.shape == (1, 64, 64, 3)


# --------------------------------------------------------------------------------------------------------------
# style LoRA: the objective, short runs, the file
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoising_loss_target_follows_prediction_type(prediction_type):
    from lcmkit.denoisers import TextConditioning
    from lcmkit.math.schedule import alphas_cumprod_from_betas, scaled_linear_betas
    from lcmkit.train.style_lora import denoising_loss

    unet = tiny.tiny_unet()
    ac = alphas_cumprod_from_betas(scaled_linear_betas()).double()
    g = torch.Generator().manual_seed(0)
    z0, eps, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32)
    t = torch.tensor([10, 900])
    a, s = ac[t].sqrt().float().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().float().view(-1, 1, 1, 1)
    with torch.no_grad():
        out = unet(a * z0 + s * eps, t, ctx).sample
        want = eps if prediction_type == "epsilon" else a * eps - s * z0
        ref = ((out - want) ** 2).mean()
        got = denoising_loss(unet, z0, eps, t, TextConditioning(ctx), ac, prediction_type)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v"])
def test_style_lora_lowers_loss_and_loads_everywhere(kind, tiny_sd_dir, tiny_sd_v_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from lcmkit.lora import lora_layers
    from lcmkit.lora_formats import load_lora
    from lcmkit.task_arithmetic import attach_loras

    model = tiny_sd_dir if kind == "epsilon" else tiny_sd_v_dir
    out = tmp_path / "style.safetensors"
    cfg = style_cfg(model, out, caption_dropout=0.0 if kind == "epsilon" else 0.3)
    before = style_fixed_loss(cfg)
    assert train_style_lora(cfg) == out
    after = style_fixed_loss(cfg, latest(cfg.run_folder))
    assert after < before, (before, after)
    assert (tmp_path / "style.run" / "validation" / "step-0000006.png").is_file()
    assert (tmp_path / "style.run" / "config.yaml").is_file()

    trained = DiffusionPipeline.from_pretrained(str(model)).unet
    weights = load_lora(out, trained)
    assert all(k.startswith("unet.") for k in weights) and all(w.alpha == 8.0 and w.rank == 4 for w in weights.values())
    ckpt_layers = {k.split(".lora_A.")[0] for k in load_checkpoint(latest(cfg.run_folder))[0]["lora"]
                   if ".lora_A." in k}
    assert {k.removeprefix("unet.") for k in weights} == ckpt_layers  # every trained layer is in the file
    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert set(lora_layers(pipe.unet)) == ckpt_layers  # diffusers applies every layer ...
    with attach_loras({"unet": trained}, [(weights, 1.0)]):  # ... with the same scale alpha / r = 2
        assert _unet_outputs_differ(pipe.unet, trained) < 1e-5
    assert _unet_outputs_differ(pipe.unet, DiffusionPipeline.from_pretrained(str(model)).unet) > 1e-4


# --------------------------------------------------------------------------------------------------------------
# resume: N steps straight == N/2, stop, resume, N/2 more (bit for bit)
# --------------------------------------------------------------------------------------------------------------

def _same_checkpoints(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    assert a.name == b.name == "step-0000004"
    for f in sorted(a.glob("*.safetensors")):
        wa, wb = load_file(str(f)), load_file(str(b / f.name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f.name


@pytest.mark.parametrize("recipe", ["lcf-full", "style"])
def test_resume_is_exact(recipe, tiny_lcm_dir, tiny_sd_dir, tmp_path):
    # batch 2 of 5 samples, 2 micro-batches: every step crosses data epochs; cosine schedule with warm-up
    kw = dict(max_steps=4, batch_size=2, generated_samples=5, grad_accum=2, warmup_steps=1, lr_schedule="cosine",
              checkpoint_every=1)
    if recipe == "lcf-full":
        def make(name, **k):
            return lcf_cfg(tiny_lcm_dir, tmp_path / name, ema=0.9, cache_latents=True, **kw, **k)
        run, folder = finetune, lambda name: tmp_path / name  # noqa: E731
    else:
        def make(name, **k):
            return style_cfg(tiny_sd_dir, tmp_path / f"{name}.safetensors", caption_dropout=0.5, **kw, **k)
        run, folder = train_style_lora, lambda name: tmp_path / f"{name}.run"  # noqa: E731
    run(make("straight"))
    run(make("split", stop_at=2))
    assert not json.loads((folder("split") / "summary.json").read_text())["finished"]
    run(make("split", resume=True))
    _same_checkpoints(latest(folder("straight")), latest(folder("split")))
    la = json.loads((folder("straight") / "summary.json").read_text())["losses"]
    lb = json.loads((folder("split") / "summary.json").read_text())["losses"]
    assert la[2:] == lb


# --------------------------------------------------------------------------------------------------------------
# bad arguments: one line, exit 2
# --------------------------------------------------------------------------------------------------------------

def _cli(args, capsys) -> tuple[int, str]:
    from lcmkit.cli import main

    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_finetune_bad_arguments(tiny_lcm_dir, tiny_sd_dir, lcm_lora_file, tmp_path, capsys):
    o = str(tmp_path / "o")
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    cases = [
        (["--model", str(tiny_sd_dir)], "not a full LCM"),
        (["--model", str(tiny_lcm_dir), "--lora", str(lcm_lora_file)], "is a full LCM"),
        (["--model", str(tiny_sd_dir), "--lora", str(tmp_path / "none.safetensors")], "not found"),
        (["--model", str(tiny_sd_dir), "--lora", str(pickle)], "pickle"),
        (["--model", str(tiny_lcm_dir), "--omega-min", "9", "--omega-max", "3"], "omega_min 9.0 > omega_max 3.0"),
        (["--model", str(tiny_lcm_dir), "--ema", "1"], "ema must be in [0, 1)"),
        (["--model", str(tmp_path / "nope")], "model folder"),
        (["--model", str(tiny_lcm_dir), "--data", "world:sketchy"], "unknown world style"),
    ]
    for extra, message in cases:
        args = ["finetune", "--data", "world:outlined", "--out", o, "--max-steps", "1", "--device", "cpu",
                "--no-progress", *extra]
        code, err = _cli(args, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (extra, err)


def test_lora_train_bad_arguments(tiny_sd_dir, tiny_lcm_dir, tmp_path, capsys):
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    cases = [
        (["--out", str(tmp_path / "style.bin")], "must end in .safetensors"),
        (["--caption-dropout", "1.5"], "caption_dropout is a probability"),
        (["--lora-rank", "0"], "lora_rank must be >= 1"),
        (["--lora-targets", "no_such_layer"], "matched no layer"),
        (["--model", str(tiny_lcm_dir)], "is a full LCM"),
        (["--out", str(tmp_path / "exists.safetensors")], "exists; pass --overwrite"),
        (["--model", str(tiny_sd_dir), "--validation-guidance", "0.5"], "validation_guidance"),
    ]
    for extra, message in cases:
        args = ["lora", "train", "--model", str(tiny_sd_dir), "--data", "world:outlined", "--out",
                str(tmp_path / "s.safetensors"), "--max-steps", "1", "--device", "cpu", "--no-progress", *extra]
        code, err = _cli(args, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (extra, err)


def test_cli_refuses_abbreviated_or_unknown_flags(capsys):
    """``--mode`` is not a finetune flag: it must not be taken as an abbreviation of ``--model``."""
    from lcmkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model", "m", "--mode", "full", "--data", "world", "--out", "o"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --mode full" in err and len(err.strip().splitlines()) == 1
