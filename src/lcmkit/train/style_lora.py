"""Style LoRA: ordinary diffusion fine-tuning of a base model's UNet through a LoRA (the τ_style of task arithmetic,
LCM-LoRA report eq. 3: θ' = θ_pre + λ1·τ_style + λ2·τ_LCM).

The recipe, per optimizer step (one micro-batch per ``grad_accum``; each process its own shard of the data):

1. a batch of images → z0 = E(x)·scaling_factor (VAE posterior mean) and text conditioning c; with probability
   ``caption_dropout`` a sample's c is replaced by the unconditional one ("" for SD, zeros for SDXL), so the LoRA
   also learns the unconditional branch classifier-free guidance uses;
2. per sample: t ~ U{0 … T−1}, ε ~ N(0, I), the dropout coin, drawn in that order from a generator seeded by
   (seed, step, micro-batch, rank), so a resumed run redraws them exactly;
3. :func:`denoising_loss`: x_t = α_t z0 + σ_t ε and ‖model(x_t, t, c) − target‖², the target matching the model's
   ``prediction_type`` (:func:`lcmkit.math.param.from_x0_eps`: ε for epsilon models, v = α_t ε − σ_t z0 for
   v-prediction ones);
4. :func:`lcmkit.train.optim.optimizer_step`.

LoRA on ``lora_targets`` (a preset of :data:`lcmkit.lora.LORA_TARGET_PRESETS`, default ``lcm-lora``, or a comma
list of module-name suffixes), rank/alpha ``lora_rank``/``lora_alpha``, B = 0 at the start (the adapted UNet equals
the base). Output (``lora_format``, default ``kohya,diffusers``; :func:`lcmkit.lora_export.write_lora_files`):
``--out FILE.safetensors`` with diffusers' keys (``unet.<module>.lora_A/B``, rank and alpha in the header, read by
``load_lora_weights``) and ``FILE_kohya.safetensors`` beside it (kohya keys and alphas, which ComfyUI, Forge,
AUTOMATIC1111 and sd-scripts apply whole), factors in ``save_dtype``; ``lcmkit generate BASE --lora`` reads both.

Run folder (``run_dir``, default ``<FILE without .safetensors>.run/`` beside it): ``config.yaml``,
``checkpoints/step-N/``, ``logs/``, ``validation/step-N.png`` (rows: the base model, then with the LoRA, DDIM with
CFG; columns: prompts, fixed seeds), ``summary.json``. The rest (mixed precision, resume, data) as
:mod:`lcmkit.train.finetune` and :mod:`lcmkit.train.distill`, whose pieces this reuses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoisers import (
    TextConditioning,
    architecture,
    has_w_embedding,
    unet_denoiser,
    unet_output,
)
from ..errors import LcmkitError
from ..math.param import from_x0_eps
from ..math.schedule import alpha_sigma, alphas_cumprod_from_config, append_dims
from .config import LoraSaveOptions, TrainingOptions
from .data import default_validation_prompts, make_data
from .finetune import freeze_frozen_parts
from .loop import Run
from .rng import generator_for
from .runtime import autocast, weight_dtype

RESULT_NAMES = ("summary.json", "validation")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class StyleLoraConfig(TrainingOptions, LoraSaveOptions):
    """Everything ``lcmkit lora train`` reads. YAML keys and CLI flags have the same names (``-`` for ``_``)."""

    model: str = ""                   # base diffusers pipeline folder: SD 1.x/2.x (eps or v) or SDXL
    out: str = ""                     # the LoRA file to write (.safetensors)
    run_dir: str | None = None        # checkpoints, logs, grids; default <out without .safetensors>.run
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str = "lcm-lora"    # preset (lcm-lora, attention) or comma-separated module-name suffixes
    caption_dropout: float = 0.0      # probability of training a sample on the unconditional embedding
    validation_steps: int = 25        # DDIM steps of the validation grid
    validation_guidance: float = 7.5  # diffusers guidance_scale of the validation grid (ω = g − 1)

    def __post_init__(self):
        self.check_training(model_key="model")
        if Path(self.out).suffix != ".safetensors":
            raise LcmkitError(f"--out names the LoRA file and must end in .safetensors, got {self.out}")
        self.check_lora_save()
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise LcmkitError(f"lora_rank must be >= 1 and lora_alpha > 0 (got {self.lora_rank}, {self.lora_alpha})")
        target_modules(self.lora_targets)
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise LcmkitError(f"caption_dropout is a probability in [0, 1], got {self.caption_dropout}")
        if self.validation_steps < 1:
            raise LcmkitError(f"validation_steps must be >= 1, got {self.validation_steps}")
        if not (math.isfinite(self.validation_guidance) and self.validation_guidance >= 1):
            raise LcmkitError(f"validation_guidance is diffusers' guidance_scale, >= 1; got {self.validation_guidance}")

    @property
    def run_folder(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.out).with_suffix(".run")


def target_modules(spec: str) -> tuple[str, ...]:
    """A preset name of :data:`lcmkit.lora.LORA_TARGET_PRESETS` or a comma list of module-name suffixes."""
    from ..lora import LORA_TARGET_PRESETS

    if spec in LORA_TARGET_PRESETS:
        return LORA_TARGET_PRESETS[spec]
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not names:
        raise LcmkitError(f"lora_targets {spec!r} is no preset ({', '.join(LORA_TARGET_PRESETS)}) and no comma "
                          "list of module names (e.g. to_q,to_k,to_v,to_out.0)")
    return names


# ---------------------------------------------------------------------------------------------------------------
# The loss and the draws
# ---------------------------------------------------------------------------------------------------------------

def denoising_loss(unet, z0: Tensor, noise: Tensor, t: Tensor, cond: TextConditioning, alphas_cumprod: Tensor,
                   prediction_type: str) -> Tensor:
    """The diffusion (noise-prediction) loss: ‖model(x_t, t, c) − target‖², x_t = α_t z0 + σ_t ε (DDPM, Ho et al.
    2020; v-prediction, Salimans & Ho 2022). target: ε, v = α_t ε − σ_t z0, or z0, after ``prediction_type``.

    z0, noise (B, C, H, W); t (B,) long. Mean over every element, in float32.
    """
    alpha_t, sigma_t = (append_dims(v, z0.ndim).to(z0.device, torch.float32) for v in alpha_sigma(alphas_cumprod, t))
    z0, noise = z0.float(), noise.float()
    x_t = alpha_t * z0 + sigma_t * noise
    target = from_x0_eps(z0, noise, alpha_t, sigma_t, prediction_type)
    return F.mse_loss(unet_output(unet, x_t, t, cond).float(), target)


def draw(batch: int, shape: tuple, num_train_timesteps: int,
         generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """t ~ U{0 … T−1} (B,), ε ~ N(0, I) (B, C, H, W), u ~ U[0, 1) (B,) for caption dropout, in that order, on CPU."""
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return t, noise, u


def drop_captions(cond: TextConditioning, uncond: TextConditioning, drop: Tensor) -> TextConditioning:
    """Per sample: the unconditional conditioning where ``drop`` (B,) bool is True, else the caption's."""
    def pick(c, u):
        if c is None:
            return None
        mask = drop.to(c.device).view(-1, *([1] * (c.ndim - 1)))
        return torch.where(mask, u.to(c.dtype), c)
    return TextConditioning(pick(cond.encoder_hidden_states, uncond.encoder_hidden_states),
                            pick(cond.text_embeds, uncond.text_embeds), cond.time_ids)


@dataclass
class StyleModels:
    pipe: object
    arch: str
    unet: torch.nn.Module          # the base UNet with the trainable adapter
    alphas_cumprod: Tensor         # (T,) float64, on the device
    prediction_type: str
    device: torch.device
    mixed_precision: str

    def trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]


def build_models(cfg: StyleLoraConfig, pipe, device: torch.device, generator: torch.Generator) -> StyleModels:
    """Freeze the base model, cast it to the weight dtype, add the LoRA (float32, B = 0, A from ``generator``)."""
    from ..lora import init_lora_A_, lora_config

    unet = pipe.unet
    if has_w_embedding(unet):
        raise LcmkitError(f"{cfg.model} is a full LCM (its UNet has a guidance embedding); train the style LoRA on "
                          "the base model and combine it with the LCM-LoRA (lcmkit lora combine / generate --lora)")
    freeze_frozen_parts(pipe, device, cfg.mixed_precision)
    unet.requires_grad_(False).to(device, weight_dtype(cfg.mixed_precision))
    try:
        unet.add_adapter(lora_config(target_modules(cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha))
    except ValueError as e:  # peft: no module matched
        raise LcmkitError(f"lora_targets {cfg.lora_targets!r} matched no layer of this UNet ({e})") from e
    init_lora_A_(unet, generator)
    for p in unet.parameters():
        if p.requires_grad:  # the LoRA weights train in float32 whatever the base dtype
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return StyleModels(pipe, architecture(unet), unet, alphas_cumprod_from_config(pipe.scheduler.config).to(device),
                       pipe.scheduler.config.get("prediction_type", "epsilon"), device, cfg.mixed_precision)


def step_loss(models: StyleModels, cfg: StyleLoraConfig, z0: Tensor, cond: TextConditioning,
              uncond: TextConditioning, t: Tensor, noise: Tensor, u: Tensor) -> Tensor:
    """One micro-batch's loss for the draws (t, ε, u), captions dropped where u < ``caption_dropout``."""
    cond = drop_captions(cond, uncond, u < cfg.caption_dropout)
    with autocast(models.device, models.mixed_precision):
        return denoising_loss(models.unet, z0, noise.to(models.device), t.to(models.device), cond,
                              models.alphas_cumprod, models.prediction_type)


# ---------------------------------------------------------------------------------------------------------------
# Validation and output
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def validation_images(models: StyleModels, prompts: list[str], cfg: StyleLoraConfig, resolution: int) -> list[list]:
    """Two rows, the base model then base + LoRA: DDIM with CFG (``validation_guidance``, negative prompt "" /
    zeros as :func:`lcmkit.pipelines.generate`), one column per prompt, prompt i always from seed + i."""
    from ..pipelines import (
        decode_latents,
        encode_prompt,
        encode_unconditional,
        initial_latents,
        sample_teacher,
        teacher_scheduler,
        teacher_timesteps,
        to_pil,
    )

    pipe, unet = models.pipe, models.unet
    cond = encode_prompt(pipe, prompts, resolution, resolution)
    uncond = encode_unconditional(pipe, None, len(prompts), resolution, resolution, cond)
    denoiser = unet_denoiser(unet, models.alphas_cumprod, cond, prediction_type=models.prediction_type,
                             uncond=uncond, omega=cfg.validation_guidance - 1.0)
    rows = []
    was_training = unet.training
    unet.eval()
    try:
        for adapters in (False, True):
            unet.enable_adapters() if adapters else unet.disable_adapters()
            generators = [torch.Generator(models.device).manual_seed(cfg.validation_seed + i)
                          for i in range(len(prompts))]
            x = initial_latents(pipe, generators, resolution, resolution, torch.float32, models.device)
            scheduler = teacher_scheduler(pipe, "ddim")
            timesteps = teacher_timesteps(scheduler, cfg.validation_steps, 1.0)
            with autocast(models.device, models.mixed_precision):
                z0 = sample_teacher(scheduler, denoiser, x, timesteps)
            rows.append(to_pil(decode_latents(pipe, z0)))
    finally:
        unet.enable_adapters()
        unet.train(was_training)
    return rows


def save_style_lora(unet, path: Path, cfg: StyleLoraConfig) -> dict[str, Path]:
    """The adapter as ``path`` and the other ``cfg.lora_format`` files beside it (each written atomically: never
    half a file where a good one was); returns ``{format: path}``."""
    from ..lora import adapter_weights
    from ..lora_export import save_options, write_lora_files

    return write_lora_files(adapter_weights(unet), path, unet=unet, **save_options(cfg))


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

def _setup(cfg: StyleLoraConfig, device: torch.device):
    from ..pipelines import load_pipeline, vae_scale_factor

    pipe = load_pipeline(cfg.model, device="cpu", dtype=None)
    models = build_models(cfg, pipe, device, generator_for(cfg.seed, 0xA11CE))
    factor = vae_scale_factor(pipe)
    resolution = cfg.resolution or models.unet.config.sample_size * factor
    if resolution % factor:
        raise LcmkitError(f"resolution {resolution} is not a multiple of the VAE scale factor {factor}")
    return pipe, models, resolution


def train_style_lora(cfg: StyleLoraConfig) -> Path:
    """Train a style LoRA on ``cfg.data``; returns the LoRA file (``cfg.out``)."""
    from ..lora_export import output_paths

    out = Path(cfg.out)
    for path in output_paths(out, cfg.lora_format).values():
        if path.exists() and not (cfg.overwrite or cfg.resume) and int(os.environ.get("RANK", "0")) == 0:
            raise LcmkitError(f"{path} exists; pass --overwrite to replace it, --resume to continue its run, or "
                              "choose another --out")
    run = Run.start(cfg, cfg.run_folder, RESULT_NAMES, "lcmkit lora train")
    device = run.device
    pipe, models, resolution = _setup(cfg, device)
    T = len(models.alphas_cumprod)
    run.record_config({"architecture": models.arch, "resolution": resolution,
                       "prediction_type": models.prediction_type,
                       "target_modules": list(target_modules(cfg.lora_targets)), "run_dir": str(run.folder)})
    source, stream, encoder = make_data(cfg, pipe, models.arch, device, resolution, run.rank, run.world_size,
                                        cfg.progress and run.main)
    run.optimise([p for _, p in models.trainable_named()],
                 {"lora_rank": cfg.lora_rank, "lora_alpha": float(cfg.lora_alpha)},
                 lambda weights, path: _load_lora_weights(models, weights["lora"], path), stream)
    prompts = default_validation_prompts(cfg, source, resolution, stream)

    def micro_loss(step: int, micro: int) -> Tensor:
        """The denoising loss of one micro-batch: the next samples, the draws (t, ε, u) of (seed, step, micro,
        rank)."""
        z0, cond, uncond = encoder(stream.next_batch(cfg.batch_size))
        t, noise, u = draw(z0.shape[0], tuple(z0.shape), T, generator_for(cfg.seed, step, micro, run.rank))
        return step_loss(models, cfg, z0, cond, uncond, t, noise, u)

    run.train(micro_loss, desc="lora train", checkpoint_weights=lambda: {"lora": dict(models.trainable_named())},
              position=stream, checkpoint_extra={"lora_rank": cfg.lora_rank, "lora_alpha": float(cfg.lora_alpha)},
              validate=lambda: validation_images(models, prompts, cfg, resolution))
    run.finish(out, lambda: save_style_lora(models.unet, out, cfg), **source.report())
    return out


def _load_lora_weights(models: StyleModels, weights: dict[str, Tensor], path) -> None:
    named = dict(models.trainable_named())
    if set(named) != set(weights):
        raise LcmkitError(f"checkpoint {path} holds different LoRA layers than this model (other lora_targets?)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(weights[n])
