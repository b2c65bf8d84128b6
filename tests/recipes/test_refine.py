"""lcmkit refine (one-step refinement of a full LCM; lcmkit's addition, not in the LCM paper) on tiny random models:
short runs with both pair sources lower the one-step loss on the pairs and save a pipeline diffusers loads, the
anchor holds the rest of the grid, the pairs are the solutions they claim to be, exact resume, bad arguments.

Prompts come from the built-in world's open captions; the tiny models work at 64 px (8×8 latents).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fixed_losses import refine_losses

from lcmkit.train.checkpoint import checkpoint_dirs, load_checkpoint
from lcmkit.train.config import build_config
from lcmkit.train.refine import (
    NOISE_KEY,
    PAIRS_FILE,
    TEACHER_STEPS,
    RefineConfig,
    read_pairs,
    refine,
)
from lcmkit.train.rng import generator_for

torch.set_num_threads(1)

RUN = dict(data="world:open", num_pairs=16, batch_size=4, max_steps=10, lr=1e-4, warmup_steps=0,
           lr_schedule="constant", checkpoint_every=100, log_every=1, progress=False, device="cpu", seed=3)


def refine_cfg(model, out, **kw) -> RefineConfig:
    return build_config(RefineConfig, None, {**RUN, "model": str(model), "out": str(out), **kw})


def latest(folder) -> Path:
    return checkpoint_dirs(folder)[-1]


def _summary(folder) -> dict:
    return json.loads((Path(folder) / "summary.json").read_text())


# --------------------------------------------------------------------------------------------------------------
# short runs: the one-step loss on the pairs goes down, the output loads
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["self", "teacher"])
def test_refine_lowers_the_one_step_loss_and_saves_an_lcm_pipeline(source, tiny_lcm_dir, tiny_sd_dir, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from lcmkit.pipelines import generate

    # the teacher's solutions start far from the random LCM's one step: a larger lr moves it in a few steps
    kw = dict(teacher=str(tiny_sd_dir), lr=1e-3) if source == "teacher" else {}
    cfg = refine_cfg(tiny_lcm_dir, tmp_path / "run", **kw)
    result = refine(cfg)
    assert result == tmp_path / "run" / "pipeline"
    before = refine_losses(cfg)
    after = refine_losses(cfg, latest(cfg.out))
    assert after["top"] < 0.9 * before["top"], (before, after)

    summary = _summary(cfg.out)
    assert summary["finished"] and summary["step"] == 10 and summary["nonfinite_skipped"] == 0
    assert summary["num_pairs"] == 16 and summary["top_timestep"] == 999
    assert summary["pair_source"] == (f"teacher dpm-solver++-{TEACHER_STEPS}" if source == "teacher" else "self tcd-4")
    assert len(summary["top_losses"]) == len(summary["anchor_losses"]) == 10
    assert (tmp_path / "run" / "logs" / "log.jsonl").is_file() and (result / "config.yaml").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / PAIRS_FILE).is_file()
    from PIL import (
        Image,  # the validation grid of the last step: rows 1, 2, 4 LCM steps, ≤ 4 prompt columns
    )

    grid = Image.open(tmp_path / "run" / "validation" / "step-0000010.png")
    assert grid.size[1] == 3 * 64 and grid.size[0] in {64 * n for n in range(1, 5)}

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(result))
    original = LatentConsistencyModelPipeline.from_pretrained(str(tiny_lcm_dir))
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
    assert dict(pipe.scheduler.config) == dict(original.scheduler.config)  # the scheduler is unchanged
    weights = load_checkpoint(latest(cfg.out))[0]["unet"]  # the saved UNet is θ of the last step
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    assert any(not torch.equal(v, original.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    images = generate(str(result), "a red circle", steps=1, guidance=7.5, device="cpu", progress=False,
                      output_type="np")
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


# --------------------------------------------------------------------------------------------------------------
# the anchor holds the rest of the grid to the starting model
# --------------------------------------------------------------------------------------------------------------

def test_anchor_holds_the_rest_of_the_grid(tiny_lcm_dir, tmp_path):
    anchored = refine_cfg(tiny_lcm_dir, tmp_path / "anchored", anchor_weight=1.0)
    free = refine_cfg(tiny_lcm_dir, tmp_path / "free", anchor_weight=0.0)
    refine(anchored)
    refine(free)
    # step 1: θ is the starting model, so the anchor term is 0 up to float round-off (θ runs on a batch of 2B, θ₀ on
    # B: CPU kernels may sum in another order); later it is not
    assert _summary(anchored.out)["anchor_losses"][0] < 1e-8
    assert all(v > 0 for v in _summary(anchored.out)["anchor_losses"][1:])
    assert all(v == 0.0 for v in _summary(free.out)["anchor_losses"])  # weight 0: not computed
    assert _summary(free.out)["losses"] == pytest.approx(_summary(free.out)["top_losses"], rel=1e-6)

    start = refine_losses(anchored)
    held = refine_losses(anchored, latest(anchored.out))
    drifted = refine_losses(free, latest(free.out))
    assert start["anchor"] < 1e-9  # the evaluation measures the distance to the starting model
    # same pairs, same draws: away from the top, the anchored model stays nearer the starting model
    assert 0 < held["anchor"] < 0.8 * drifted["anchor"], (held, drifted)


# --------------------------------------------------------------------------------------------------------------
# the pairs are the solutions they claim to be
# --------------------------------------------------------------------------------------------------------------

def _check_noise(noise: torch.Tensor, seed: int) -> None:
    for i in range(len(noise)):
        want = torch.randn((1, *noise.shape[1:]), generator=generator_for(seed, NOISE_KEY, i))
        assert torch.equal(noise[i:i + 1], want), i


def test_self_pairs_are_the_lcms_own_deterministic_tcd(tiny_lcm_dir, tmp_path):
    from lcmkit.denoisers import unet_denoiser
    from lcmkit.math.schedule import alphas_cumprod_from_config
    from lcmkit.math.timesteps import lcm_timesteps
    from lcmkit.pipelines import encode_prompt, load_pipeline
    from lcmkit.solvers import sample_tcd

    cfg = refine_cfg(tiny_lcm_dir, tmp_path / "run", num_pairs=6, batch_size=2, max_steps=1, pair_steps=3,
                     omega=4.0)
    refine(cfg)
    noise, z0, captions = read_pairs(tmp_path / "run" / PAIRS_FILE, cfg, 64)
    assert len(set(captions)) > 1 and all(c.startswith("a ") for c in captions)
    _check_noise(noise, cfg.seed)
    pipe = load_pipeline(tiny_lcm_dir, device="cpu")
    ac = alphas_cumprod_from_config(pipe.scheduler.config)
    with torch.no_grad():
        for i in (0, 5):
            den = unet_denoiser(pipe.unet, ac, encode_prompt(pipe, [captions[i]], 64, 64), w_omega=4.0)
            by_hand = sample_tcd(den, noise[i:i + 1].clone(), lcm_timesteps(3, 1000, 50), ac, gamma=0.0)
            assert torch.allclose(z0[i:i + 1], by_hand, atol=1e-5, rtol=1e-5), i


def test_teacher_pairs_are_diffusers_dpm_solver_pp_25_with_cfg(tiny_lcm_dir, tiny_sd_dir, tmp_path):
    """Checked against diffusers' own StableDiffusionPipeline (DPM-Solver++ order 2, 25 steps, guidance ω + 1,
    output_type="latent") from the same initial latents: lcmkit's sampling loop is not used."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    cfg = refine_cfg(tiny_lcm_dir, tmp_path / "run", teacher=str(tiny_sd_dir), num_pairs=4, batch_size=2,
                     max_steps=1, omega=5.0)
    refine(cfg)
    noise, z0, captions = read_pairs(tmp_path / "run" / PAIRS_FILE, cfg, 64)
    _check_noise(noise, cfg.seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    for i in (0, 3):
        latents = pipe(captions[i], latents=noise[i:i + 1].clone(), num_inference_steps=25, guidance_scale=6.0,
                       height=64, width=64, output_type="latent").images
        assert torch.allclose(z0[i:i + 1], latents, atol=1e-4, rtol=1e-4), (i, (z0[i:i + 1] - latents).abs().max())


# --------------------------------------------------------------------------------------------------------------
# pairs made in shares (one per process), merged; a killed run's finished share is kept
# --------------------------------------------------------------------------------------------------------------

class _OneProcess:
    """The part of an accelerate.Accelerator that make_pairs_file uses, for one process."""
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def test_pairs_in_shares_equal_the_pairs_made_at_once_and_a_finished_share_is_kept(tiny_lcm_dir, tmp_path):
    from lcmkit.train.refine import (
        PARTS_FOLDER,
        _setup,
        make_pairs,
        make_pairs_file,
        share,
        write_pairs,
    )

    for n, w in ((5, 1), (5, 2), (7, 3), (4, 4)):
        shares = [share(n, r, w) for r in range(w)]
        assert [i for s in shares for i in s] == list(range(n)) and max(map(len, shares)) - min(map(len, shares)) <= 1

    out = tmp_path / "run"
    cfg = refine_cfg(tiny_lcm_dir, out, num_pairs=5, batch_size=2, max_steps=1, pair_steps=2)
    _, models, resolution, _, _ = _setup(cfg, torch.device("cpu"))
    whole = make_pairs(cfg, models, resolution, False)
    halves = [make_pairs(cfg, models, resolution, False, r) for r in (range(0, 2), range(2, 5))]
    assert torch.equal(whole["noise"], torch.cat([h["noise"] for h in halves]))
    assert torch.allclose(whole["z0"], torch.cat([h["z0"] for h in halves]), rtol=1e-5, atol=1e-4)
    assert [h["metadata"]["stop"] for h in halves] == ["2", "5"]

    # a share a killed run finished (marked: z0 + 1) is used as it is; one with other settings is made again
    part = out / PARTS_FOLDER / "part-000-of-001.safetensors"
    part.parent.mkdir(parents=True)
    write_pairs(part, {**whole, "z0": whole["z0"] + 1})
    assert make_pairs_file(cfg, models, resolution, out, _OneProcess()) > 0
    noise, z0, _ = read_pairs(out / PAIRS_FILE, cfg, resolution)
    assert torch.equal(noise, whole["noise"]) and torch.equal(z0, whole["z0"] + 1)
    assert not (out / PARTS_FOLDER).exists()
    assert make_pairs_file(cfg, models, resolution, out, _OneProcess()) is None  # there already: kept

    (out / PAIRS_FILE).unlink()
    part.parent.mkdir()
    write_pairs(part, {**whole, "z0": whole["z0"] + 1, "metadata": {**whole["metadata"], "omega": "9.0"}})
    make_pairs_file(cfg, models, resolution, out, _OneProcess())
    assert torch.allclose(read_pairs(out / PAIRS_FILE, cfg, resolution)[1], whole["z0"], rtol=1e-5, atol=1e-4)


def test_two_processes_torchrun_share_the_pairs(tiny_lcm_dir, tmp_path):
    """torchrun, 2 processes (gloo on CPU): each makes half of the pairs, the merged file equals a one-process
    run's, the weights agree across ranks, and one result line is printed."""
    import tiny

    from lcmkit.train.refine import PARTS_FOLDER

    kw = dict(num_pairs=6, batch_size=2, max_steps=2, pair_steps=2)
    one = refine_cfg(tiny_lcm_dir, tmp_path / "one", **kw)
    refine(one)
    out = tmp_path / "two"
    proc = tiny.torchrun_lcmkit(
        ["refine", "--model", str(tiny_lcm_dir), "--data", "world:open", "--out", str(out), "--num-pairs", "6",
         "--batch-size", "2", "--max-steps", "2", "--pair-steps", "2", "--seed", "3", "--validate-every", "0",
         "--no-progress", "--device", "cpu"],
        port=29900 + os.getpid() % 90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out / "pipeline")]
    summary = _summary(out)
    assert summary["processes"] == 2 and summary["ranks_consistent"] and summary["finished"]
    assert not (out / PARTS_FOLDER).exists()
    two_cfg = refine_cfg(tiny_lcm_dir, out, **kw)
    n1, z1, c1 = read_pairs(tmp_path / "one" / PAIRS_FILE, one, 64)
    n2, z2, c2 = read_pairs(out / PAIRS_FILE, two_cfg, 64)
    assert c1 == c2 and torch.equal(n1, n2) and torch.allclose(z1, z2, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# resume: N steps straight == N/2, stop, resume, N/2 more (bit for bit); the pairs are reused
# --------------------------------------------------------------------------------------------------------------

def test_resume_is_exact_and_reuses_the_pairs(tiny_lcm_dir, tmp_path):
    kw = dict(max_steps=4, batch_size=2, num_pairs=5, grad_accum=2, warmup_steps=1, lr_schedule="cosine",
              checkpoint_every=1, lr=3e-4)
    refine(refine_cfg(tiny_lcm_dir, tmp_path / "straight", **kw))
    refine(refine_cfg(tiny_lcm_dir, tmp_path / "split", stop_at=2, **kw))
    assert not _summary(tmp_path / "split")["finished"]
    assert not (tmp_path / "split" / "pipeline").exists()
    pairs = tmp_path / "split" / PAIRS_FILE
    made = os.stat(pairs).st_mtime_ns, os.stat(pairs).st_ino
    refine(refine_cfg(tiny_lcm_dir, tmp_path / "split", resume=True, **kw))
    assert (os.stat(pairs).st_mtime_ns, os.stat(pairs).st_ino) == made  # not made again
    assert _summary(tmp_path / "split")["pairs_made_seconds"] is None

    a, b = latest(tmp_path / "straight"), latest(tmp_path / "split")
    assert a.name == b.name == "step-0000004"
    wa, wb = load_checkpoint(a)[0]["unet"], load_checkpoint(b)[0]["unet"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = _summary(tmp_path / "straight"), _summary(tmp_path / "split")
    assert sa["losses"][2:] == sb["losses"] and sa["anchor_losses"][2:] == sb["anchor_losses"]

    # a resume with other pair settings is refused, not silently mixed: as a changed recipe, and by the pairs file
    # itself when the change is allowed (--allow-changed-recipe)
    with pytest.raises(Exception, match="changed recipe: omega 6.5 -> 2.0"):
        refine(refine_cfg(tiny_lcm_dir, tmp_path / "split", resume=True, omega=2.0, **kw))
    with pytest.raises(Exception, match="pairs file .* was made with omega"):
        refine(refine_cfg(tiny_lcm_dir, tmp_path / "split", resume=True, omega=2.0, allow_changed_recipe=True, **kw))


# --------------------------------------------------------------------------------------------------------------
# bad arguments: one line, exit 2
# --------------------------------------------------------------------------------------------------------------

def test_refine_bad_arguments(tiny_lcm_dir, tiny_sd_dir, tmp_path, capsys):
    from lcmkit.cli import main

    cases = [
        (["--model", str(tiny_sd_dir)], "is not a full LCM"),
        (["--anchor-weight", "-1"], "anchor_weight must be a finite number >= 0"),
        (["--num-pairs", "3", "--batch-size", "4"], "num_pairs (3) must be >= batch_size (4)"),
        (["--omega", "-0.5"], "omega must be a finite number >= 0"),
        (["--pair-steps", "0"], "pair_steps must be >= 1"),
        (["--teacher", str(tiny_lcm_dir)], "is a full LCM"),
        (["--teacher", str(tmp_path / "nope")], "is not a diffusers pipeline folder"),
        (["--data", str(tmp_path / "nope")], "not found"),
        (["--model", str(tmp_path / "nope")], "model folder"),
    ]
    for extra, message in cases:
        args = ["refine", "--model", str(tiny_lcm_dir), "--data", "world:open", "--out", str(tmp_path / "o"),
                "--num-pairs", "4", "--batch-size", "2", "--max-steps", "1", "--device", "cpu", "--no-progress",
                "--overwrite", *extra]
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, (extra, err)


def test_refine_defaults_are_the_measured_recipe(tiny_lcm_dir, tmp_path, capsys):
    """Refine's loop defaults are its measured recipe (batch 32, 4,000 steps, cosine lr 1e-4 without warm-up), as
    the help says; YAML and flags still override them, and the other recipes keep the shared defaults."""
    from lcmkit.cli import main
    from lcmkit.commands._training import LOOP_DEFAULTS
    from lcmkit.commands.refine import DEFAULTS
    from lcmkit.train.distill import DistillConfig

    base = {"model": str(tiny_lcm_dir), "data": "world:open", "out": str(tmp_path / "o")}
    cfg = build_config(RefineConfig, None, base)
    got = {"batch_size": cfg.batch_size, "max_steps": cfg.max_steps, "warmup_steps": cfg.optim.warmup_steps,
           "lr_schedule": cfg.optim.lr_schedule}
    assert got == DEFAULTS == {"batch_size": 32, "max_steps": 4000, "warmup_steps": 0, "lr_schedule": "cosine"}
    assert cfg.optim.lr == 1e-4 and RefineConfig(**base).optim == cfg.optim  # built in code: the same defaults

    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("optim:\n  lr_schedule: constant\n  warmup_steps: 7\nbatch_size: 16\n")
    cfg = build_config(RefineConfig, yaml_file, {**base, "warmup_steps": 3})
    assert (cfg.optim.lr_schedule, cfg.optim.warmup_steps, cfg.batch_size, cfg.max_steps) == ("constant", 3, 16, 4000)

    distill = DistillConfig(teacher=str(tiny_lcm_dir), data="world", out=str(tmp_path / "d"))
    assert {"batch_size": distill.batch_size, "max_steps": distill.max_steps,
            "warmup_steps": distill.optim.warmup_steps, "lr_schedule": distill.optim.lr_schedule} == LOOP_DEFAULTS

    with pytest.raises(SystemExit):
        main(["refine", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "micro-batch (default 32)" in text and "optimizer steps (default 4000)" in text
    assert "warm-up, optimizer steps (default 0)" in text and "after warm-up (default cosine)" in text
