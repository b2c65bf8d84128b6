"""Deterministic losses of a checkpoint on a fixed evaluation set, one per recipe (test helpers).

Each takes a recipe's config and a checkpoint (None: the starting model), draws a fixed batch and fixed draws, and
returns the recipe's loss, so two checkpoints can be compared (the per-step training loss swings with the random
draws). They call the recipes' own model builders, data and loss functions.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from lcmkit.pipelines import load_pipeline, native_size, resolve_device
from lcmkit.train import distill as lcd
from lcmkit.train import finetune as lcf
from lcmkit.train import refine as rf
from lcmkit.train import style_lora as sl
from lcmkit.train.checkpoint import load_checkpoint
from lcmkit.train.data import DataSource, DataStream, make_data
from lcmkit.train.encode import EMPTY_PROMPT_UNCOND, Encoder, encode_text
from lcmkit.train.rng import generator_for
from lcmkit.train.runtime import autocast


@torch.no_grad()
def distill_loss(cfg: lcd.DistillConfig, checkpoint: str | os.PathLike | None = None, draws: int = 4,
                    seed: int = 1234) -> float:
    """The distillation loss of ``checkpoint`` (None: the step-0 student) on a fixed evaluation set: the first
    ``cfg.batch_size`` samples of the data and ``draws`` fixed (ω, n, ε) draws; averaged. Deterministic, so two
    checkpoints can be compared (the per-step training loss swings with the random t_n). UNet and flow (SD3, FLUX)
    teachers alike: the recipe's own family (models, grid, loss)."""

    device = resolve_device(cfg.device)
    pipe = load_pipeline(cfg.teacher, device="cpu", flow=True)
    family = lcd.family_of(pipe)
    resolution = cfg.resolution or native_size(pipe)
    models = family.build_models(cfg, pipe, device, generator_for(cfg.seed, 0xA11CE), resolution)
    if checkpoint is not None:
        models.load_weights(load_checkpoint(checkpoint)[0], checkpoint)
    num_points = family.num_points(models, cfg)
    omegas = lcd.omega_range(cfg, models.omega_preset)
    stream = DataStream(DataSource(cfg, resolution), cfg, resolution, 0, 1)
    encoder = Encoder(pipe, models.arch, device)  # no caches: the first batch, encoded as it comes
    if models.arch in EMPTY_PROMPT_UNCOND:
        encoder.uncond_hidden, encoder.uncond_pooled = encode_text(pipe, models.arch, [""])
    z0, cond, uncond = encoder(stream.next_batch(cfg.batch_size))
    total = 0.0
    for d in range(draws):
        omega, index, noise = lcd.draw(z0.shape[0], tuple(z0.shape), omegas, num_points, generator_for(seed, d))
        total += float(family.step_loss(models, cfg, z0, cond, uncond, omega, index, noise))
    return total / draws



@torch.no_grad()
def finetune_loss(cfg: lcf.FinetuneConfig, checkpoint=None, draws: int = 4, seed: int = 1234) -> float:
    """The LCF loss of ``checkpoint`` (None: the starting model) on a fixed evaluation set: the first
    ``cfg.batch_size`` samples and ``draws`` fixed (ω, n, ε) draws, averaged. Deterministic, so two checkpoints
    can be compared (the per-step training loss swings with the random t_n)."""

    device = resolve_device(cfg.device)
    pipe, models, resolution, num_points = lcf._setup(cfg, device)
    if checkpoint is not None:
        models.load_weights(load_checkpoint(checkpoint)[0], checkpoint)
    _, stream, encoder = make_data(cfg, pipe, models.arch, device, resolution, 0, 1, False)
    z0, cond, _ = encoder(stream.next_batch(cfg.batch_size))
    omegas = lcd.omega_range(cfg, models.arch)
    total = 0.0
    for d in range(draws):
        omega, index, noise = lcd.draw(z0.shape[0], tuple(z0.shape), omegas, num_points, generator_for(seed, d))
        total += float(lcf.step_loss(models, cfg, z0, cond, omega, index, noise))
    return total / draws



@torch.no_grad()
def refine_losses(cfg: rf.RefineConfig, checkpoint=None, count: int = 8, seed: int = 1234) -> dict[str, float]:
    """The two terms of ``checkpoint`` (None: the starting model) on a fixed evaluation set: the first ``count``
    pairs of ``out/pairs.safetensors`` and one fixed draw of (t, ε). ``top``: d(f_θ(x_T, t_top), z0); ``anchor``:
    d(f_θ(z_t, t), f_θ₀(z_t, t)), whatever ``anchor_weight`` is. Deterministic, so checkpoints can be compared."""

    device = resolve_device(cfg.device)
    pipe, models, resolution, top, grid = rf._setup(cfg, device)
    if checkpoint is not None:
        models.load_weights(load_checkpoint(checkpoint)[0], checkpoint)
    models.student.eval()
    noise, z0, captions = rf.read_pairs(Path(cfg.out) / rf.PAIRS_FILE, cfg, resolution)
    index = torch.arange(min(count, len(captions)))
    _, t, eps = rf.draw_batch(len(index), len(captions), grid, tuple(noise.shape[1:]), generator_for(seed))
    cond = rf.PairText(pipe, captions, resolution, False)(index).to(device)
    measure = copy.copy(cfg)
    measure.anchor_weight = 1.0
    _, top_term, anchor = rf.refine_loss(models, measure, noise[index], z0[index], cond, top, t, eps)
    return {"top": float(top_term), "anchor": float(anchor)}



@torch.no_grad()
def style_loss(cfg: sl.StyleLoraConfig, checkpoint=None, draws: int = 4, seed: int = 1234) -> float:
    """The denoising loss of ``checkpoint`` (None: the untrained LoRA, i.e. the base model) on the first
    ``cfg.batch_size`` samples and ``draws`` fixed (t, ε) draws, captions kept; averaged. Deterministic."""

    device = resolve_device(cfg.device)
    pipe, models, resolution = sl._setup(cfg, device)
    if checkpoint is not None:
        sl._load_lora_weights(models, load_checkpoint(checkpoint)[0]["lora"], checkpoint)
    _, stream, encoder = make_data(cfg, pipe, models.arch, device, resolution, 0, 1, False)
    z0, cond, _ = encoder(stream.next_batch(cfg.batch_size))
    T = len(models.alphas_cumprod)
    total = 0.0
    for d in range(draws):
        t, noise, _ = sl.draw(z0.shape[0], tuple(z0.shape), T, generator_for(seed, d))
        with autocast(models.device, models.mixed_precision):
            total += float(sl.denoising_loss(models.unet, z0, noise.to(device), t.to(device), cond,
                                          models.alphas_cumprod, models.prediction_type))
    return total / draws
