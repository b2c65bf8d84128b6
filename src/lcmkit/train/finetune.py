"""Latent consistency fine-tuning (LCF): LCM paper Algorithm 4, on a full LCM or an LCM-LoRA.

No teacher: a pretrained LCM is adapted to new data (a custom dataset, a style) with the consistency loss alone.
The recipe, per optimizer step (one micro-batch per ``grad_accum``; each process its own shard of the data):

1. a batch of images → z = E(x)·scaling_factor (VAE posterior mean) and text conditioning c;
2. per sample: ω ~ U[ω_min, ω_max] (or a fixed ω), n ~ U{0 … N−1} with N = T // k, ε ~ N(0, I), drawn in that
   order from a generator seeded by (seed, step, micro-batch, rank) (:func:`lcmkit.train.distill.draw`), so a
   resumed run redraws them exactly;
3. :func:`lcmkit.losses.lcf_loss`: z_{t_{n+k}} = α_{t_{n+k}} z + σ_{t_{n+k}} ε and z_{t_n} = α_{t_n} z + σ_{t_n} ε
   (the SAME z and ε: the data stands in for the teacher's ODE step), loss
   d(f_θ(z_{t_{n+k}}, ω, c, t_{n+k}), f_θ⁻(z_{t_n}, ω, c, t_n));
4. :func:`lcmkit.train.optim.optimizer_step` (gradients averaged over processes, non-finite steps skipped and
   counted, clipping, AdamW, LR schedule in optimizer steps), then θ⁻ ← μθ⁻ + (1 − μ)θ (full mode).

**Full mode** (``--model`` is an LCM pipeline folder whose UNet has ``time_cond_proj_dim``): θ starts as that UNet,
θ⁻ as a copy of it, updated by EMA (``ema`` = μ); ω enters through the w-embedding (Algorithm 4 samples ω from a
range, as Algorithm 1). Output ``out/pipeline/``: the input pipeline (same class, same components) with θ⁻ and an
``LCMScheduler`` whose grid is the fine-tuning grid (T // k points).

**LoRA mode** (``--model`` is the base pipeline, ``--lora`` an LCM-LoRA file of any format lcmkit reads): the
file's layers become a trainable peft adapter on the UNet (rank and alpha per layer, as in the file); the target is
the online model without gradients (no EMA, as LCM-LoRA); guidance is baked in (no ω). Output (``lora_format``,
default ``kohya,diffusers``; :func:`lcmkit.lora_export.write_lora_files`): ``out/lora/<the input file's name>`` with
diffusers' keys (read by ``load_lora_weights``) and ``<its stem>_kohya.safetensors`` beside it (kohya keys, which
ComfyUI, Forge, AUTOMATIC1111 and sd-scripts apply whole), factors in ``save_dtype``, whatever format the input was.

Mixed precision, checkpoints, resume, logs and validation grids work as in :mod:`lcmkit.train.distill`, and the data
pipeline is distillation's (:class:`~lcmkit.train.data.DataStream`, :class:`~lcmkit.train.encode.Encoder`).
Output folder ``out/``: ``config.yaml``, ``checkpoints/step-N/``, ``logs/``, ``validation/step-N.png`` (rows: LCM
step counts; columns: prompts), ``summary.json`` and the result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import atomic_folder
from ..denoisers import TextConditioning, architecture, has_w_embedding, unet_denoiser
from ..errors import LcmkitError
from ..losses import lcf_loss
from .config import ConsistencyOptions, LoraSaveOptions
from .data import default_validation_prompts, make_data
from .distill import DEFAULT_VALIDATION_OMEGA, Models, draw, omega_range, validation_images
from .roles import freeze_frozen_parts
from .loop import Run
from .optim import ema_update_
from .rng import generator_for
from .runtime import autocast, weight_dtype

RESULT_NAMES = ("pipeline", "lora", "summary.json", "validation")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig(ConsistencyOptions, LoraSaveOptions):
    """Everything ``lcmkit finetune`` reads. YAML keys and CLI flags have the same names (``-`` for ``_``)."""

    model: str = ""                   # full LCM pipeline folder, or the base pipeline of --lora
    out: str = ""                     # output folder
    lora: str | None = None           # LCM-LoRA .safetensors for --model (LoRA mode); None = full mode

    def __post_init__(self):
        self.check_training(model_key="model")
        self.check_consistency()
        self.check_lora_save()
        if self.lora is not None:
            from ..lora_formats import check_safetensors_file

            check_safetensors_file(self.lora)

    @property
    def mode(self) -> str:
        return "full" if self.lora is None else "lora"


# ---------------------------------------------------------------------------------------------------------------
# Models: θ and θ⁻ (no teacher)
# ---------------------------------------------------------------------------------------------------------------

def lora_file_format(path: str | Path) -> str:
    """The format a LoRA file is written in (``diffusers``, ``peft`` or ``kohya``), key by key; a file mixing
    formats counts as ``diffusers`` (what we write it back as)."""
    from ..lora_formats import parse_key, read_safetensors

    state, _ = read_safetensors(path)
    formats = {parse_key(k).fmt for k in state}
    return formats.pop() if len(formats) == 1 else "diffusers"


def build_models(cfg: FinetuneConfig, pipe, device: torch.device) -> Models:
    """θ (student) and θ⁻ (target) for ``cfg.mode``; in LoRA mode both are the one adapted UNet.

    ``Models.teacher`` is None: LCF has no teacher.
    """
    from ..lora import load_into_adapters
    from ..lora_formats import load_lora

    unet = pipe.unet
    arch = architecture(unet)
    freeze_frozen_parts(pipe, device, cfg.mixed_precision)
    if cfg.mode == "full":
        if not has_w_embedding(unet):
            raise LcmkitError(f"{cfg.model} is not a full LCM (its UNet has no guidance embedding, "
                              "time_cond_proj_dim); for an LCM-LoRA pass the base model with --lora FILE")
        student = unet.to(device, torch.float32).train().requires_grad_(True)
        target = copy.deepcopy(student).requires_grad_(False).eval()
    else:
        if has_w_embedding(unet):
            raise LcmkitError(f"{cfg.model} is a full LCM (its UNet has a guidance embedding); --lora expects the "
                              "base model the LCM-LoRA was trained for (drop --lora to fine-tune this LCM)")
        unet.requires_grad_(False).to(device, weight_dtype(cfg.mixed_precision))
        load_into_adapters(unet, load_lora(cfg.lora, unet))  # float32 LoRA weights, trainable
        student = target = unet.train()
    return Models.assemble(pipe, cfg, arch, None, student, target, device)


def step_loss(models: Models, cfg: FinetuneConfig, z0: Tensor, cond: TextConditioning, omega: Tensor,
              index: Tensor, noise: Tensor) -> Tensor:
    """The LCF loss of one micro-batch for the draws (ω, n, ε): θ and θ⁻ with this batch's conditioning (and, full
    mode, per-sample ω in the w-embedding) bound in, fed to :func:`lcmkit.losses.lcf_loss` under autocast."""
    ac, pt = models.alphas_cumprod, models.prediction_type
    w = omega.to(models.device) if models.mode == "full" else None
    student = unet_denoiser(models.student, ac, cond, prediction_type=pt, w_omega=w)
    target = unet_denoiser(models.target, ac, cond, prediction_type=pt, w_omega=w)
    with autocast(models.device, models.mixed_precision):
        loss, _ = lcf_loss(student, target, z0, noise.to(models.device), index.to(models.device), ac,
                           skip=cfg.skip, loss_type=cfg.loss, huber_c=cfg.huber_c)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------

def save_full_pipeline(models: Models, model_dir: str, folder: Path, num_points: int) -> None:
    """The input pipeline (same class, its own float32 VAE / text encoders from disk) with θ⁻ as its UNet and an
    ``LCMScheduler`` on the fine-tuning grid (``original_inference_steps`` = T // k)."""
    from diffusers import LCMScheduler

    from ..single_file import reload_pipeline

    scheduler = LCMScheduler.from_config(models.pipe.scheduler.config, original_inference_steps=num_points,
                                         prediction_type=models.prediction_type)
    unet = copy.deepcopy(models.target).to("cpu", torch.float32)
    pipe = reload_pipeline(model_dir, unet=unet, scheduler=scheduler)  # a folder or a single-file checkpoint
    pipe.save_pretrained(str(folder), safe_serialization=True)


def save_lora_like(unet, source_file: str | Path, folder: Path, cfg: FinetuneConfig) -> dict[str, Path]:
    """``unet``'s adapter as ``folder/<source file name>`` and the other ``cfg.lora_format`` files beside it (alphas
    kept), readable by other users (:func:`lcmkit.atomic.atomic_folder`); returns ``{format: path}``."""
    from ..lora import adapter_weights
    from ..lora_export import save_options, write_lora_files

    return write_lora_files(adapter_weights(unet), folder / Path(source_file).name, unet=unet, **save_options(cfg))


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

def _setup(cfg: FinetuneConfig, device: torch.device):
    """Pipeline + models + resolution + grid size, for :func:`finetune` (and the tests' fixed-draw losses)."""
    from ..pipelines import load_pipeline, vae_scale_factor

    pipe = load_pipeline(cfg.model, device="cpu", dtype=None)
    models = build_models(cfg, pipe, device)
    T = len(models.alphas_cumprod)
    if cfg.skip > T:
        raise LcmkitError(f"skip k={cfg.skip} exceeds the model's {T} timesteps")
    factor = vae_scale_factor(pipe)
    resolution = cfg.resolution or models.student.config.sample_size * factor
    if resolution % factor:
        raise LcmkitError(f"resolution {resolution} is not a multiple of the VAE scale factor {factor}")
    return pipe, models, resolution, T // cfg.skip


def finetune(cfg: FinetuneConfig) -> Path:
    """Run latent consistency fine-tuning; returns the output (``out/pipeline`` or ``out/lora/<file>``)."""
    run = Run.start(cfg, cfg.out, RESULT_NAMES, "lcmkit finetune")
    device = run.device
    pipe, models, resolution, num_points = _setup(cfg, device)
    omegas = omega_range(cfg, models.arch)
    run.record_config({"mode": cfg.mode, "architecture": models.arch, "resolution": resolution,
                       "num_grid_points": num_points, "omega_range": list(omegas) if cfg.mode == "full" else None,
                       "input_lora_format": lora_file_format(cfg.lora) if cfg.lora else None})
    source, stream, encoder = make_data(cfg, pipe, models.arch, device, resolution, run.rank, run.world_size,
                                        cfg.progress and run.main)
    run.optimise(models.trainable(), {"mode": cfg.mode}, models.load_weights, stream)
    prompts = default_validation_prompts(cfg, source, resolution, stream)

    def micro_loss(step: int, micro: int) -> Tensor:
        """The LCF loss of one micro-batch: the next samples, the draws (ω, n, ε) of (seed, step, micro, rank)."""
        z0, cond, _ = encoder(stream.next_batch(cfg.batch_size))
        omega, index, noise = draw(z0.shape[0], tuple(z0.shape), omegas, num_points,
                                   generator_for(cfg.seed, step, micro, run.rank))
        return step_loss(models, cfg, z0, cond, omega, index, noise)

    def update_target(outcome) -> None:
        if outcome.ok and cfg.mode == "full":  # θ⁻ ← μθ⁻ + (1 − μ)θ
            ema_update_(models.target.parameters(), models.student.parameters(), cfg.ema)

    run.train(micro_loss, desc=f"finetune ({cfg.mode})", checkpoint_weights=models.checkpoint_weights,
              position=stream, after_step=update_target, checkpoint_extra={"mode": cfg.mode},
              validate=lambda: validation_images(models, encoder, prompts, cfg.validation_steps,
                                                 DEFAULT_VALIDATION_OMEGA if cfg.validation_omega is None
                                                 else cfg.validation_omega, cfg.validation_seed, resolution,
                                                 num_points))

    result_dir = Path(cfg.out) / ("pipeline" if cfg.mode == "full" else "lora")
    result = result_dir if cfg.mode == "full" else result_dir / Path(cfg.lora).name

    def write_result(folder: Path) -> None:
        if cfg.mode == "full":
            save_full_pipeline(models, cfg.model, folder, num_points)
        else:
            save_lora_like(models.student, cfg.lora, folder, cfg)
        run.write_config(folder)

    run.finish(result, lambda: atomic_folder(result_dir, write_result), mode=cfg.mode, **source.report())
    return result
