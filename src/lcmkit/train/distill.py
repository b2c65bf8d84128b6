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

**Flow-matching teachers** (SD3 / SD3.5, ``StableDiffusion3Pipeline``; FLUX.1, ``FluxPipeline``; LoRA mode only):
the same recipe on the rectified flow, :mod:`lcmkit.train.flow_distill` (σ grid on the pipeline's shifted table,
Euler / Heun teacher solvers, f_θ(x_σ, σ) = x_σ − σ·v_θ; FLUX.1-dev's ω through its guidance embedding;
docs/flow-matching.md). Their LoRA is written by default as ``diffusers,comfyui``: the diffusers file above and
``pytorch_lora_weights_comfyui.safetensors`` (the same keys with an ``.alpha`` tensor per layer, which ComfyUI
reads); transformers have no kohya names. A :class:`DistillFamily` says what differs (building
the roles, the grid, one micro-batch's loss, validation grids); the loop, data, checkpoints, resume, EMA target and
LoRA export are this module's for both.

**Mixed precision**: the frozen teacher (LoRA: the base weights), VAE and text encoders are cast to the weight
dtype (fp16/bf16) and run *outside* autocast; only the student/target forwards run under autocast, trainable
weights stay float32, fp16 uses a GradScaler.

Output folder ``out/``: ``config.yaml`` (resolved), ``checkpoints/step-N/`` (atomic, last K kept), ``logs/``
(TensorBoard + log.jsonl), ``validation/step-N.png`` (rows: 1/2/4 LCM steps; columns: prompts, fixed seeds),
``summary.json`` and the result: ``pipeline/`` (full) or ``lora/`` (LoRA).
"""

from __future__ import annotations

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
from .roles import (  # noqa: F401  (EmaLoraTarget, Roles, freeze_frozen_parts: also imported from here)
    EmaLoraTarget,
    Roles,
    adapters_off,
    freeze_frozen_parts,
    lora_roles,
    under_autocast,
)
from .runtime import weight_dtype

MODES = ("full", "lora")
#: Width of the guidance embedding of ω (``time_cond_proj_dim``), as the released LCMs.
W_EMBEDDING_DIM = 256
#: ω range when none is given, by ``Roles.omega_preset``: the released LCM code's for SD / SDXL (docs/reference.md,
#: Guidance ω); for flow teachers lcmkit's choices (docs/flow-matching.md, "Distillation options"): SD3 and FLUX
#: guided by true CFG g = ω + 1 ∈ [3.5, 7]; FLUX.1-dev's embedded g = ω + 1 ∈ [2, 5], around its default 3.5
DEFAULT_OMEGA = {"sd": (5.0, 15.0), "sdxl": (3.0, 15.0), "sd3": (2.5, 6.0), "flux": (1.0, 4.0),
                 "flux-cfg": (2.5, 6.0)}
#: ω of validation grids when none is given: a full LCM's w-embedding (the released LCMs' g = 8); a guidance-
#: distilled FLUX student is validated at the middle of its trained ω range instead
DEFAULT_VALIDATION_OMEGA = 7.0
#: teacher solver Ψ when none is given, by teacher kind
DEFAULT_SOLVER = {"unet": "ddim", "flow": "euler"}
RESULT_NAMES = ("pipeline", "lora", "summary.json", "validation")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class DistillConfig(ConsistencyOptions, LoraSaveOptions):
    """Everything ``lcmkit distill`` reads. YAML keys and CLI flags have the same names (``-`` for ``_``)."""

    teacher: str = ""                 # diffusers pipeline folder: SD 1.x/2.x (eps or v), SDXL, SD3, FLUX
    out: str = ""                     # output folder
    mode: str = "lora"                # full (w-embedding student + EMA target) or lora (LCM-LoRA)
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_ema: float = 0.0             # LoRA mode: μ of an EMA of the adapter weights as θ⁻; 0 = online (reference)
    solver: str | None = None         # teacher solver Ψ: ddim (default), dpm-solver, dpm-solver++; flow: euler, heun
    top_fraction: float = 0.0         # extra share of pairs drawn at the grid's top point (the 1-step sampler's t)

    def __post_init__(self):
        self.check_training(model_key="teacher")
        self.check_consistency()
        self.check_lora_save(resolve=False)  # resolved by the teacher's kind
        self.check_teacher_kind()
        if self.mode not in MODES:
            raise LcmkitError(f"mode must be full or lora, got {self.mode!r}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise LcmkitError(f"lora_rank must be >= 1 and lora_alpha > 0 (got {self.lora_rank}, {self.lora_alpha})")
        if not 0.0 <= self.lora_ema < 1.0:
            raise LcmkitError(f"lora_ema must be in [0, 1) (0 = online target, the reference), got {self.lora_ema}")
        if self.lora_ema > 0 and self.mode != "lora":
            raise LcmkitError("lora_ema is for --mode lora; a full model's target EMA is --ema")
        if not (math.isfinite(self.top_fraction) and 0.0 <= self.top_fraction < 1.0):
            raise LcmkitError(f"top_fraction must be in [0, 1) (0 = uniform n, the reference), got {self.top_fraction}")

    @property
    def teacher_kind(self) -> str:
        """``"flow"`` for a flow-matching teacher folder (SD3, FLUX), else ``"unet"`` (read from its
        model_index.json)."""
        from ..flow_pipelines import folder_flow_family

        return "unet" if folder_flow_family(self.teacher) is None else "flow"

    def check_teacher_kind(self) -> None:
        """The options that depend on the teacher's kind: the solver (its default too), full mode and the LoRA
        formats (their default too: a flow transformer's LoRA has no kohya names)."""
        from ..flow_pipelines import folder_flow_family
        from ..flow_solvers import FLOW_SOLVERS
        from ..lora_export import DEFAULT_FLOW_LORA_FORMATS, DEFAULT_LORA_FORMATS, parse_formats

        kind = self.teacher_kind
        solvers = FLOW_SOLVERS if kind == "flow" else SOLVERS
        self.solver = self.solver or DEFAULT_SOLVER[kind]
        if self.solver not in solvers:
            if self.solver not in {*SOLVERS, *FLOW_SOLVERS}:
                raise LcmkitError(f"unknown solver {self.solver!r}; use one of {', '.join(solvers)}")
            other = "flow-matching (SD3, FLUX)" if kind == "unet" else "UNet (DDPM)"
            raise LcmkitError(f"solver {self.solver} is for {other} teachers; this teacher takes "
                              f"{', '.join(solvers)}")
        if kind != "flow":
            self.lora_format = self.lora_format or DEFAULT_LORA_FORMATS
            return
        if self.mode == "full" and folder_flow_family(self.teacher) == "sd3":
            raise LcmkitError("--mode full puts ω into a guidance embedding, which SD3 transformers do not have; "
                              "distil a flow teacher with --mode lora (guidance baked in)")
        if self.mode == "full":
            raise LcmkitError("--mode full is not implemented for FLUX teachers; distil with --mode lora (on a "
                              "guidance-distilled FLUX the LoRA takes ω through the guidance embedding)")
        if self.lora_format is None:
            self.lora_format = DEFAULT_FLOW_LORA_FORMATS
        elif "kohya" in parse_formats(self.lora_format):  # an explicit value is honoured or refused, never rewritten
            raise LcmkitError(f"--lora-format {self.lora_format}: kohya has no key names for a transformer's layers; "
                              f"write a flow teacher's LoRA as diffusers, comfyui (default: both) and/or peft")


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
class Models(Roles):
    """The roles on a UNet teacher's noise schedule: its ᾱ table and prediction type."""

    alphas_cumprod: Tensor     # (T,) float64, on the device
    prediction_type: str

    @classmethod
    def assemble(cls, pipe, cfg, arch: str, teacher, student, target, device: torch.device) -> Models:
        """The roles on ``pipe``'s noise schedule and prediction type, with gradient checkpointing on the student
        when ``cfg`` asks for it (shared by distillation and fine-tuning)."""
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return cls(pipe=pipe, mode=cfg.mode, arch=arch, teacher=teacher, student=student, target=target,
                   device=device, mixed_precision=cfg.mixed_precision,
                   alphas_cumprod=alphas_cumprod_from_config(pipe.scheduler.config).to(device),
                   prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"))


def build_models(cfg: DistillConfig, pipe, device: torch.device, generator: torch.Generator,
                 resolution: int | None = None) -> Models:
    """Freeze and cast the teacher's parts, then build the student and target for ``cfg.mode`` (``resolution``:
    not needed on a UNet's noise schedule; the flow family's grid depends on it)."""
    from ..lora import lcm_lora_config

    unet = pipe.unet
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise LcmkitError(f"teacher {cfg.teacher} is already a full LCM (its UNet has a guidance embedding); "
                          "distil from the base model it came from")
    arch = architecture(unet)
    freeze_frozen_parts(pipe, device, cfg.mixed_precision)
    if cfg.mode == "full":
        unet.requires_grad_(False).eval()
        student = make_student_unet(unet.to(device, torch.float32)).train()
        student.requires_grad_(True)
        target = copy.deepcopy(student).requires_grad_(False).eval()
        teacher = unet.to(device, weight_dtype(cfg.mixed_precision))
    else:
        teacher, student, target = lora_roles(unet, lcm_lora_config(arch, cfg.lora_rank, cfg.lora_alpha), cfg,
                                              device, generator)
    return Models.assemble(pipe, cfg, arch, teacher, student, target, device)


def make_denoisers(models: Models, cond: TextConditioning, uncond: TextConditioning, omega: Tensor):
    """(student, target, teacher) denoisers with this batch's conditioning and per-sample ω bound in."""
    ac, pt = models.alphas_cumprod, models.prediction_type
    teacher = unet_denoiser(models.teacher, ac, cond, prediction_type=pt, uncond=uncond, omega=omega)
    if models.mode == "lora":
        teacher = adapters_off(teacher, models.teacher)
    w = omega if models.mode == "full" else None  # full LCM: ω enters through the w-embedding
    student = under_autocast(unet_denoiser(models.student, ac, cond, prediction_type=pt, w_omega=w), models)
    target = under_autocast(unet_denoiser(models.target, ac, cond, prediction_type=pt, w_omega=w), models)
    return student, target, teacher


def step_loss(models: Models, cfg: DistillConfig, z0: Tensor, cond: TextConditioning, uncond: TextConditioning,
              omega: Tensor, index: Tensor, noise: Tensor) -> Tensor:
    """The LCD loss (:func:`lcmkit.losses.lcd_loss`) of one micro-batch for the draws (ω, n, ε)."""
    device = models.device
    student, target, teacher = make_denoisers(models, cond, uncond, omega.to(device))
    loss, _ = lcd_loss(student, target, teacher, z0, noise.to(device), index.to(device), models.alphas_cumprod,
                       skip=cfg.skip, solver=cfg.solver, loss_type=cfg.loss, huber_c=cfg.huber_c)
    return loss


def num_points(models: Models, cfg: DistillConfig) -> int:
    """N = T // k, the points of the skipping-step grid on the teacher's T timesteps."""
    T = len(models.alphas_cumprod)
    if cfg.skip > T:
        raise LcmkitError(f"skip k={cfg.skip} exceeds the teacher's {T} timesteps")
    return T // cfg.skip


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
    denoiser = under_autocast(unet_denoiser(model, models.alphas_cumprod, cond, prediction_type=models.prediction_type,
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
        unet = models.student if models.component == "unet" else None  # (SDXL's kohya keys need the UNet)
        write_lora_files(adapter_weights(models.student, component=models.component), folder / LORA_WEIGHT_NAME,
                         unet=unet, **save_options(cfg))

    if isinstance(models.target, EmaLoraTarget):  # written inside: the EMA weights are in the UNet only there
        with models.target.applied(dict(models.trainable_named())):
            write()
    else:
        write()


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillFamily:
    """What the recipe does differently for a kind of teacher; everything else (data, loop, checkpoints, resume,
    EMA target, outputs) is shared. Each entry is a function:

    - ``build_models(cfg, pipe, device, generator, resolution) -> roles`` (θ, θ⁻, teacher, their schedule);
    - ``num_points(roles, cfg) -> N``, the grid's pair count (n ~ U{0 … N−1});
    - ``step_loss(roles, cfg, z0, cond, uncond, ω, n, ε) -> loss`` of one micro-batch;
    - ``validation_images(roles, encoder, prompts, steps, ω, seed, resolution, N) -> rows of images``.
    """

    build_models: Callable
    num_points: Callable
    step_loss: Callable
    validation_images: Callable


UNET = DistillFamily(build_models, num_points, step_loss, validation_images)


def family_of(pipe) -> DistillFamily:
    """:data:`UNET`, or for an SD3 or FLUX pipeline the flow family (:data:`lcmkit.train.flow_distill.FLOW`)."""
    from ..flow_pipelines import flow_family

    if flow_family(pipe) is None:
        return UNET
    from .flow_distill import FLOW

    return FLOW


def distill(cfg: DistillConfig) -> Path:
    """Run latent consistency distillation; returns the output (``out/pipeline`` or ``out/lora``)."""
    from ..pipelines import load_pipeline, native_size, vae_scale_factor

    run = Run.start(cfg, cfg.out, RESULT_NAMES, "lcmkit distill")
    device = run.device
    pipe = load_pipeline(cfg.teacher, device="cpu", dtype=None, flow=True)
    family = family_of(pipe)
    factor = vae_scale_factor(pipe)
    resolution = cfg.resolution or native_size(pipe)
    if resolution % factor:
        raise LcmkitError(f"resolution {resolution} is not a multiple of the VAE scale factor {factor}")
    models = family.build_models(cfg, pipe, device, generator_for(cfg.seed, 0xA11CE), resolution)
    points = family.num_points(models, cfg)
    omegas = omega_range(cfg, models.omega_preset)
    # a student that takes ω through a guidance embedding (FLUX.1-dev: g = ω + 1) is sampled with a g it was
    # trained on: record that range, and validate inside it
    embedded = getattr(models, "embedded", False)
    validation_omega = cfg.validation_omega
    if validation_omega is None:
        validation_omega = sum(omegas) / 2 if embedded else DEFAULT_VALIDATION_OMEGA
    record = {"embedded_guidance_range": [omegas[0] + 1, omegas[1] + 1]} if embedded else {}
    run.record_config({"architecture": models.arch, "resolution": resolution, "num_grid_points": points,
                       "omega_range": list(omegas), **record})
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
        omega, index, noise = draw(z0.shape[0], tuple(z0.shape), omegas, points,
                                   generator_for(cfg.seed, step, micro, run.rank), cfg.top_fraction)
        return family.step_loss(models, cfg, z0, cond, uncond, omega, index, noise)

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
              validate=lambda: family.validation_images(models, encoder, validation_prompts, cfg.validation_steps,
                                                        validation_omega, cfg.validation_seed, resolution, points))

    result = Path(cfg.out) / ("pipeline" if cfg.mode == "full" else "lora")

    def write_result(folder: Path) -> None:
        if cfg.mode == "full":
            save_full_pipeline(models, cfg, folder, points)
        else:
            save_lora_output(models, cfg, folder)
        run.write_config(folder)

    run.finish(result, lambda: atomic_folder(result, write_result), **source.report())
    return result
