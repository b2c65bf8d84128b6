"""Latent consistency distillation: LCM paper Algorithm 1 (CFG-augmented PF-ODE, skipping step k), full or LoRA.

The recipe, per optimizer step (one micro-batch per ``grad_accum``; each process its own shard of the data):

1. a batch of images → z = E(x)·scaling_factor (the VAE posterior **mean**: deterministic, so a cached latent and a
   freshly encoded one are the same numbers) and text conditioning c (SD: "" is the unconditional prompt; SDXL:
   all-zero embeddings, with size/crop time ids in (height, width) order);
2. per sample: ω ~ U[ω_min, ω_max] (or a fixed ω), n ~ U{0 … N−1} with N = T // k, ε ~ N(0, I), drawn in that
   order from a generator seeded by (seed, step, micro-batch, rank), so a resumed run redraws them exactly;
3. :func:`lcmkit.losses.lcd_loss`: z_{t_{n+k}} = α z + σ ε; the guided teacher (one batched cond + uncond
   forward) takes one solver step Ψ to ẑ_{t_n}; loss d(f_θ(z_{t_{n+k}}, ω, c, t_{n+k}), f_θ⁻(ẑ_{t_n}, ω, c, t_n));
4. gradients averaged over processes, non-finite steps skipped and counted, clipping, AdamW, LR schedule (in
   optimizer steps), then θ⁻ ← μθ⁻ + (1 − μ)θ (full mode).

**Full mode**: the student is the teacher UNet rebuilt with ``time_cond_proj_dim = 256`` (guidance embedding of ω,
LCM paper §4.2) and a zero-initialised ``time_embedding.cond_proj``, so the student equals the teacher at step 0;
the target θ⁻ is an EMA (``ema`` = μ; 0 = a copy of θ every step). Output: a diffusers
``LatentConsistencyModelPipeline`` folder (SDXL: ``StableDiffusionXLPipeline``) with ``LCMScheduler``.

**LoRA mode** (LCM-LoRA): LoRA (rank/alpha 64/64, B = 0) on :data:`lcmkit.lora.LCM_LORA_TARGETS`; one UNet in
memory: the teacher is that UNet with adapters disabled, the target is the online model without gradients
(no EMA, as the LCM-LoRA scripts), or with ``lora_ema`` = μ > 0 the same UNet called with an EMA copy of the
adapter weights (:class:`EmaLoraTarget`). Guidance is baked in (no w-embedding). Output (``lora_format``, default
``kohya,diffusers``; :func:`lcmkit.lora_export.write_lora_files`): ``pytorch_lora_weights.safetensors`` (diffusers'
keys, for ``load_lora_weights(folder)``) and ``pytorch_lora_weights_kohya.safetensors`` (kohya keys, which
ComfyUI, Forge, AUTOMATIC1111 and sd-scripts apply whole), factors in ``save_dtype``.

**Mixed precision**: the frozen teacher (LoRA: the base weights), VAE and text encoders are cast to the weight
dtype (fp16/bf16) and run *outside* autocast; only the student/target forwards run under autocast, trainable
weights stay float32, fp16 uses a GradScaler.

Output folder ``out/``: ``config.yaml`` (resolved), ``checkpoints/step-N/`` (atomic, last K kept), ``logs/``
(TensorBoard + log.jsonl), ``validation/step-N.png`` (rows: 1/2/4 LCM steps; columns: prompts, fixed seeds),
``summary.json`` and the result: ``pipeline/`` (full) or ``lora/`` (LoRA).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..atomic import atomic_folder
from ..denoisers import TextConditioning, architecture, unet_denoiser
from ..errors import LcmkitError
from ..losses import lcd_loss
from ..math.schedule import alphas_cumprod_from_config
from ..math.timesteps import lcm_timesteps
from ..solvers import SOLVERS, randn, sample_lcm
from .config import ConsistencyOptions, LoraSaveOptions
from .data import default_validation_prompts, make_data
from .encode import Encoder, encode_text
from .loop import Run
from .optim import ema_update_
from .rng import generator_for
from .runtime import autocast, weight_dtype

MODES = ("full", "lora")
#: Width of the guidance embedding of ω (``time_cond_proj_dim``), as the released LCMs.
W_EMBEDDING_DIM = 256
#: ω range when none is given: the released LCM code's (docs/reference.md, Guidance ω).
DEFAULT_OMEGA = {"sd": (5.0, 15.0), "sdxl": (3.0, 15.0)}
RESULT_NAMES = ("pipeline", "lora", "summary.json", "validation")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class DistillConfig(ConsistencyOptions, LoraSaveOptions):
    """Everything ``lcmkit distill`` reads. YAML keys and CLI flags have the same names (``-`` for ``_``)."""

    teacher: str = ""                 # diffusers pipeline folder: SD 1.x/2.x (eps or v) or SDXL
    out: str = ""                     # output folder
    mode: str = "lora"                # full (w-embedding student + EMA target) or lora (LCM-LoRA)
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_ema: float = 0.0             # LoRA mode: μ of an EMA of the adapter weights as θ⁻; 0 = online (reference)
    solver: str = "ddim"              # teacher solver Ψ: ddim, dpm-solver, dpm-solver++
    top_fraction: float = 0.0         # extra share of pairs drawn at the grid's top point (the 1-step sampler's t)

    def __post_init__(self):
        self.check_training(model_key="teacher")
        self.check_consistency()
        self.check_lora_save()
        if self.mode not in MODES:
            raise LcmkitError(f"mode must be full or lora, got {self.mode!r}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise LcmkitError(f"lora_rank must be >= 1 and lora_alpha > 0 (got {self.lora_rank}, {self.lora_alpha})")
        if not 0.0 <= self.lora_ema < 1.0:
            raise LcmkitError(f"lora_ema must be in [0, 1) (0 = online target, the reference), got {self.lora_ema}")
        if self.lora_ema > 0 and self.mode != "lora":
            raise LcmkitError("lora_ema is for --mode lora; a full model's target EMA is --ema")
        if self.solver not in SOLVERS:
            raise LcmkitError(f"unknown solver {self.solver!r}; use one of {', '.join(SOLVERS)}")
        if not (math.isfinite(self.top_fraction) and 0.0 <= self.top_fraction < 1.0):
            raise LcmkitError(f"top_fraction must be in [0, 1) (0 = uniform n, the reference), got {self.top_fraction}")


# ---------------------------------------------------------------------------------------------------------------
# Models: teacher, student θ, target θ⁻
# ---------------------------------------------------------------------------------------------------------------

def make_student_unet(teacher_unet, w_dim: int = W_EMBEDDING_DIM):
    """The teacher's UNet rebuilt with a guidance embedding (``time_cond_proj_dim = w_dim``).

    Every teacher weight is copied; the new ``time_embedding.cond_proj`` (Linear(w_dim → C), no bias) starts at
    zero, so the student's output equals the teacher's for any ω at step 0 (the reference scripts leave it random).
    """
    from diffusers import UNet2DConditionModel

    # private keys dropped: "_use_default_values" lists time_cond_proj_dim for an in-memory UNet, and from_config
    # would then reset it to its default (None)
    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = w_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise LcmkitError(f"teacher UNet does not fit its own config (missing {missing}, unexpected {unexpected})")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=teacher_unet.device, dtype=torch.float32)


@dataclass
class Models:
    """The three roles of Algorithm 1. In LoRA mode ``teacher``, ``student`` and ``target`` are the same UNet."""

    pipe: object               # the teacher pipeline (VAE, text encoders, tokenizers, scheduler)
    mode: str
    arch: str                  # "sd" or "sdxl"
    teacher: torch.nn.Module
    student: torch.nn.Module
    target: "torch.nn.Module | EmaLoraTarget"
    alphas_cumprod: Tensor     # (T,) float64, on the device
    prediction_type: str
    device: torch.device
    mixed_precision: str

    @classmethod
    def assemble(cls, pipe, cfg, arch: str, teacher, student, target, device: torch.device) -> Models:
        """The roles on ``pipe``'s noise schedule and prediction type, with gradient checkpointing on the student
        when ``cfg`` asks for it (shared by distillation and fine-tuning)."""
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return cls(pipe, cfg.mode, arch, teacher, student, target,
                   alphas_cumprod_from_config(pipe.scheduler.config).to(device),
                   pipe.scheduler.config.get("prediction_type", "epsilon"), device, cfg.mixed_precision)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable_named()]

    def trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    def checkpoint_weights(self) -> dict[str, dict[str, Tensor]]:
        """What a checkpoint keeps: θ and θ⁻ (full), or the LoRA layers (LoRA: θ⁻ is θ)."""
        if self.mode == "full":
            return {"student": self.student.state_dict(), "target": self.target.state_dict()}
        if isinstance(self.target, EmaLoraTarget):
            return {"lora": dict(self.trainable_named()), "lora_target": self.target.shadow}
        return {"lora": dict(self.trainable_named())}

    @torch.no_grad()
    def load_weights(self, weights: dict[str, dict[str, Tensor]], path) -> None:
        """Put back what :meth:`checkpoint_weights` saved (``path``: the checkpoint, for the message)."""
        if self.mode == "full":
            self.student.load_state_dict(weights["student"])
            self.target.load_state_dict(weights["target"])
            return
        named = dict(self.trainable_named())
        if set(named) != set(weights["lora"]):
            raise LcmkitError(f"checkpoint {path} holds different LoRA layers than this model")
        for n, p in named.items():
            p.copy_(weights["lora"][n])
        if isinstance(self.target, EmaLoraTarget):
            if set(weights.get("lora_target", {})) != set(named):
                raise LcmkitError(f"checkpoint {path} has no EMA target of these LoRA layers (trained without "
                                  "--lora-ema?)")
            for n, v in self.target.shadow.items():
                v.copy_(weights["lora_target"][n])
        elif "lora_target" in weights:
            raise LcmkitError(f"checkpoint {path} was trained with an EMA LoRA target (--lora-ema); resume with the "
                              "same --lora-ema")


class EmaLoraTarget:
    """θ⁻ of LoRA mode with an EMA: the one shared UNet, called with ``shadow`` (an EMA of the trainable adapter
    weights, by name) in place of the trained ones through ``torch.func.functional_call``. Nothing in the UNet is
    overwritten, so the student's autograd graph (which holds the adapter weights) is untouched, and the teacher
    (adapters off) and student share the same module."""

    def __init__(self, unet: torch.nn.Module, shadow: dict[str, Tensor]):
        self.unet, self.shadow = unet, shadow

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.unet, self.shadow, args, kwargs, strict=False)

    @torch.no_grad()
    def update_(self, online: dict[str, Tensor], mu: float) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ over the adapter weights."""
        ema_update_([self.shadow[n] for n in online], online.values(), mu)

    @contextlib.contextmanager
    def applied(self, online: dict[str, Tensor]):
        """The shadow weights copied into the UNet for the duration (saving the result), then the online ones back."""
        backup = {n: p.detach().clone() for n, p in online.items()}
        with torch.no_grad():
            for n, p in online.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in online.items():
                    p.copy_(backup[n])


def build_models(cfg: DistillConfig, pipe, device: torch.device, generator: torch.Generator) -> Models:
    """Freeze and cast the teacher's parts, then build the student and target for ``cfg.mode``."""
    from ..lora import init_lora_A_, lcm_lora_config

    dtype = weight_dtype(cfg.mixed_precision)
    unet = pipe.unet
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise LcmkitError(f"teacher {cfg.teacher} is already a full LCM (its UNet has a guidance embedding); "
                          "distil from the base model it came from")
    arch = architecture(unet)
    for module in (pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None), unet):
        if module is not None:
            module.requires_grad_(False).eval()
    vae_dtype = torch.float32 if (dtype == torch.float16 and pipe.vae.config.get("force_upcast", False)) else dtype
    pipe.vae.to(device, vae_dtype)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(device, dtype)
    if cfg.mode == "full":
        student = make_student_unet(unet.to(device, torch.float32)).train()
        student.requires_grad_(True)
        target = copy.deepcopy(student).requires_grad_(False).eval()
        teacher = unet.to(device, dtype)
    else:
        unet.to(device, dtype)
        unet.add_adapter(lcm_lora_config(arch, cfg.lora_rank, cfg.lora_alpha))
        init_lora_A_(unet, generator)
        for p in unet.parameters():
            if p.requires_grad:  # the LoRA weights train in float32 whatever the base dtype
                p.data = p.data.float()
        teacher = student = target = unet.train()
        if cfg.lora_ema > 0:
            target = EmaLoraTarget(unet, {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad})
    return Models.assemble(pipe, cfg, arch, teacher, student, target, device)


def _adapters_off(denoiser: Callable, unet) -> Callable:
    """The LoRA teacher: the same UNet with its adapters disabled for the duration of the call."""
    def teacher(x_t, t):
        unet.disable_adapters()
        try:
            return denoiser(x_t, t)
        finally:
            unet.enable_adapters()
    return teacher


def _autocast(denoiser: Callable, models: Models) -> Callable:
    def wrapped(x_t, t):
        with autocast(models.device, models.mixed_precision):
            return denoiser(x_t, t)
    return wrapped


def make_denoisers(models: Models, cond: TextConditioning, uncond: TextConditioning, omega: Tensor):
    """(student, target, teacher) denoisers with this batch's conditioning and per-sample ω bound in."""
    ac, pt = models.alphas_cumprod, models.prediction_type
    teacher = unet_denoiser(models.teacher, ac, cond, prediction_type=pt, uncond=uncond, omega=omega)
    if models.mode == "lora":
        teacher = _adapters_off(teacher, models.teacher)
    w = omega if models.mode == "full" else None  # full LCM: ω enters through the w-embedding
    student = _autocast(unet_denoiser(models.student, ac, cond, prediction_type=pt, w_omega=w), models)
    target = _autocast(unet_denoiser(models.target, ac, cond, prediction_type=pt, w_omega=w), models)
    return student, target, teacher


def omega_range(cfg, arch: str) -> tuple[float, float]:
    """[ω_min, ω_max] of the draws: a fixed ω, the given bounds, or the defaults of the teacher's architecture."""
    lo, hi = DEFAULT_OMEGA[arch]
    if cfg.omega is not None:
        return cfg.omega, cfg.omega
    lo = cfg.omega_min if cfg.omega_min is not None else lo
    hi = cfg.omega_max if cfg.omega_max is not None else hi
    if lo > hi:
        raise LcmkitError(f"omega range ({lo}, {hi}) is empty (min > max); set both --omega-min and --omega-max")
    return lo, hi


def draw(batch: int, shape: tuple, omega_range: tuple[float, float], num_points: int,
         generator: torch.Generator, top_fraction: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """ω ~ U[ω_min, ω_max] (B,) float64, n ~ U{0 … N−1} (B,), ε ~ N(0, I) (B, C, H, W), in that order, on CPU.

    ``top_fraction`` p > 0 (not in the paper): each n is then the top point N − 1 with probability p and uniform
    otherwise (one more uniform draw per sample, after ε), so P(n = N − 1) = p + (1 − p)/N. p = 0 draws exactly
    what the reference does.
    """
    lo, hi = omega_range
    omega = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
    index = torch.randint(0, num_points, (batch,), generator=generator)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if top_fraction > 0:
        top = torch.rand(batch, generator=generator, dtype=torch.float64) < top_fraction
        index = torch.where(top, torch.full_like(index, num_points - 1), index)
    return omega, index, noise


# ---------------------------------------------------------------------------------------------------------------
# Validation grids and outputs
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def validation_images(models: Models, encoder: Encoder, prompts: list[str], steps: list[int], omega: float,
                      seed: int, resolution: int, num_points: int) -> list[list]:
    """LCM sampling (Algorithm 3) of the current θ⁻ (full) / adapted UNet (LoRA): one row per step count,
    one column per prompt, prompt i always from seed + i."""
    from ..pipelines import decode_latents, to_pil, vae_scale_factor

    pipe = models.pipe
    hidden, pooled = encode_text(pipe, models.arch, prompts)
    time_ids = None
    if models.arch == "sdxl":
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(prompts),
                                dtype=hidden.dtype, device=hidden.device)
    cond = TextConditioning(hidden, pooled, time_ids)
    model = models.target
    denoiser = _autocast(unet_denoiser(model, models.alphas_cumprod, cond, prediction_type=models.prediction_type,
                                       w_omega=omega if models.mode == "full" else None), models)
    f = vae_scale_factor(pipe)
    shape = (len(prompts), model.config.in_channels, resolution // f, resolution // f)
    rows = []
    for n in steps:
        generators = [torch.Generator(models.device).manual_seed(seed + i) for i in range(len(prompts))]
        x = randn(shape, generators, models.device, torch.float32)
        ts = lcm_timesteps(n, len(models.alphas_cumprod), num_points)
        rows.append(to_pil(decode_latents(pipe, sample_lcm(denoiser, x, ts, models.alphas_cumprod, generators))))
    return rows


def _fp32_component(pipe, name: str, teacher_dir: str):
    """A frozen component for the output in float32: reloaded from the teacher folder if it was cast down."""
    module = getattr(pipe, name, None)
    if not isinstance(module, torch.nn.Module) or module.dtype == torch.float32:
        return module.to("cpu") if isinstance(module, torch.nn.Module) else module
    if Path(teacher_dir).expanduser().is_file():  # a single-file teacher (lcmkit.single_file)
        from ..single_file import reload_pipeline

        return getattr(reload_pipeline(teacher_dir), name).eval()
    return type(module).from_pretrained(teacher_dir, subfolder=name).eval()


def save_full_pipeline(models: Models, cfg: DistillConfig, folder: Path, num_points: int) -> None:
    """diffusers ``LatentConsistencyModelPipeline`` (SDXL: ``StableDiffusionXLPipeline``) with the target UNet θ⁻
    and an ``LCMScheduler`` on the teacher's noise schedule, whose grid is the distillation grid (T // k points)."""
    import inspect

    from diffusers import (
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionXLPipeline,
    )

    pipe = models.pipe
    scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=num_points,
                                         timestep_scaling=10.0, prediction_type=models.prediction_type)
    unet = copy.deepcopy(models.target).to("cpu", torch.float32)
    components = {name: _fp32_component(pipe, name, cfg.teacher) for name in pipe.components if name != "unet"}
    components.update(unet=unet, scheduler=scheduler)
    cls = StableDiffusionXLPipeline if models.arch == "sdxl" else LatentConsistencyModelPipeline
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in accepted}
    if "requires_safety_checker" in accepted:
        kwargs["requires_safety_checker"] = components.get("safety_checker") is not None
    if models.arch == "sdxl":
        kwargs["force_zeros_for_empty_prompt"] = pipe.config.get("force_zeros_for_empty_prompt", True)
    cls(**kwargs).save_pretrained(str(folder), safe_serialization=True)
    # the frozen parts go back to the training device/dtype (this may be a mid-run call)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if isinstance(getattr(pipe, name, None), torch.nn.Module) and components[name] is getattr(pipe, name):
            getattr(pipe, name).to(models.device)


def save_lora_output(models: Models, cfg: DistillConfig, folder: Path) -> None:
    """The adapter (θ⁻ under an EMA target, as full mode exports θ⁻) as ``folder/pytorch_lora_weights.safetensors``
    and the other ``cfg.lora_format`` files beside it (readable by other users: ``atomic_folder``)."""
    from ..lora import LORA_WEIGHT_NAME, adapter_weights
    from ..lora_export import save_options, write_lora_files

    def write() -> None:
        write_lora_files(adapter_weights(models.student), folder / LORA_WEIGHT_NAME, unet=models.student,
                         **save_options(cfg))

    if isinstance(models.target, EmaLoraTarget):  # written inside: the EMA weights are in the UNet only there
        with models.target.applied(dict(models.trainable_named())):
            write()
    else:
        write()


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

def distill(cfg: DistillConfig) -> Path:
    """Run latent consistency distillation; returns the output (``out/pipeline`` or ``out/lora``)."""
    from ..pipelines import load_pipeline, vae_scale_factor

    run = Run.start(cfg, cfg.out, RESULT_NAMES, "lcmkit distill")
    device = run.device
    pipe = load_pipeline(cfg.teacher, device="cpu", dtype=None)
    models = build_models(cfg, pipe, device, generator_for(cfg.seed, 0xA11CE))
    T = len(models.alphas_cumprod)
    if cfg.skip > T:
        raise LcmkitError(f"skip k={cfg.skip} exceeds the teacher's {T} timesteps")
    num_points = T // cfg.skip
    resolution = cfg.resolution or models.student.config.sample_size * vae_scale_factor(pipe)
    if resolution % vae_scale_factor(pipe):
        raise LcmkitError(f"resolution {resolution} is not a multiple of the VAE scale factor {vae_scale_factor(pipe)}")
    omegas = omega_range(cfg, models.arch)
    run.record_config({"architecture": models.arch, "resolution": resolution, "num_grid_points": num_points,
                       "omega_range": list(omegas)})
    source, stream, encoder = make_data(cfg, pipe, models.arch, device, resolution, run.rank, run.world_size,
                                        cfg.progress and run.main)

    lora = {"lora_rank": cfg.lora_rank, "lora_alpha": float(cfg.lora_alpha)} if cfg.mode == "lora" else {}
    if cfg.lora_ema > 0:  # (older checkpoints have no lora_ema; without it they resume as before)
        lora["lora_ema"] = cfg.lora_ema
    run.optimise(models.trainable(), {"mode": cfg.mode, **lora}, models.load_weights, stream)
    validation_prompts = default_validation_prompts(cfg, source, resolution, stream)

    def micro_loss(step: int, micro: int) -> Tensor:
        """The LCD loss of one micro-batch: the next samples, the draws (ω, n, ε) of (seed, step, micro, rank)."""
        z0, cond, uncond = encoder(stream.next_batch(cfg.batch_size))
        omega, index, noise = draw(z0.shape[0], tuple(z0.shape), omegas, num_points,
                                   generator_for(cfg.seed, step, micro, run.rank), cfg.top_fraction)
        student, target, teacher = make_denoisers(models, cond, uncond, omega.to(device))
        loss, _ = lcd_loss(student, target, teacher, z0, noise.to(device), index.to(device), models.alphas_cumprod,
                           skip=cfg.skip, solver=cfg.solver, loss_type=cfg.loss, huber_c=cfg.huber_c)
        return loss

    # the adapter weights by name, looked up once (not every step) for the LoRA-mode EMA target
    ema_lora = dict(models.trainable_named()) if isinstance(models.target, EmaLoraTarget) else None

    def update_target(outcome) -> None:
        """θ⁻ ← μθ⁻ + (1 − μ)θ after a step that was taken (full mode; LoRA mode with an EMA target)."""
        if outcome.ok and cfg.mode == "full":
            ema_update_(models.target.parameters(), models.student.parameters(), cfg.ema)
        elif outcome.ok and ema_lora:
            models.target.update_(ema_lora, cfg.lora_ema)

    run.train(micro_loss, desc=f"distill ({cfg.mode})", checkpoint_weights=models.checkpoint_weights,
              position=stream, after_step=update_target,
              checkpoint_extra={"mode": cfg.mode, "lora_rank": cfg.lora_rank, "lora_alpha": float(cfg.lora_alpha),
                                "lora_ema": cfg.lora_ema},
              validate=lambda: validation_images(models, encoder, validation_prompts, cfg.validation_steps,
                                                 cfg.validation_omega, cfg.validation_seed, resolution, num_points))

    result = Path(cfg.out) / ("pipeline" if cfg.mode == "full" else "lora")

    def write_result(folder: Path) -> None:
        if cfg.mode == "full":
            save_full_pipeline(models, cfg, folder, num_points)
        else:
            save_lora_output(models, cfg, folder)
        run.write_config(folder)

    run.finish(result, lambda: atomic_folder(result, write_result), **source.report())
    return result
