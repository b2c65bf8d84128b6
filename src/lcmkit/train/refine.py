"""One-step refinement of a full LCM after distillation (``lcmkit refine``). **Not in the LCM paper**: lcmkit's own
stage.

In LCD (LCM paper, Algorithm 1) the target at the top grid point (the 1-step sampler's timestep, t = 999 at k = 20)
is bootstrapped: the EMA student's own one step from the grid point below it. This stage instead regresses the
model's one-step output at the top point directly onto deterministic solutions z0 reached from the same initial
noise x_T, and an anchor term holds the consistency function at the rest of the grid to the starting model. It is
the algorithm of ``benchmarks/scripts/one_step_capacity.py`` (``make_pairs``, ``train --anchor``) on distillation's
machinery. The defaults (``num_pairs``, ``batch_size``, ``max_steps``, ``optim``) are the recipe whose results are
recorded in benchmarks/results/open/README.md (``refine-teacher/``).

**Pairs**, made once at the start, an equal contiguous share per process (each written atomically to
``out/pairs.parts/``, kept if a run is killed), then merged by the main process into ``out/pairs.safetensors``
(``noise``, ``z0``; captions, solver and settings in its metadata; a ``--resume`` reuses the file): ``num_pairs``
prompts drawn uniformly from the captions of ``--data`` (:meth:`~lcmkit.train.data.DataSource.captions`, generator
(seed, :data:`CAPTION_KEY`)), pair i's noise x_T from generator (seed, :data:`NOISE_KEY`, i) (never an evaluation
seed), and its solution z0 from the same x_T:

- ``--teacher DIR``: the teacher's DPM-Solver++ (order 2) in 25 steps with classifier-free guidance ω (guidance
  scale ω + 1), as ``lcmkit generate --sampler dpm-solver++ --steps 25`` in latent space;
- otherwise: the LCM's own deterministic TCD (γ = 0) in ``pair_steps`` steps, ω through its w-embedding (about
  10 × cheaper; a smooth map of x_T like the ODE's).

**The recipe**, per optimizer step (one micro-batch per ``grad_accum``): pair indices i ~ U{0 … N−1} (B of them),
grid timesteps t ~ U(grid below the top) (:func:`~lcmkit.math.timesteps.training_grid` with k = T //
``original_inference_steps`` of the model's scheduler, all but its last point) and ε ~ N(0, I), drawn in that order
from a generator seeded by (seed, step, micro-batch, rank), so a resumed run redraws them exactly; then

    loss = d(f_θ(x_T, ω, c, t_top), z0) + anchor_weight · d(f_θ(z_t, ω, c, t), f_θ₀(z_t, ω, c, t)),
    z_t = α_t·z0 + σ_t·ε,

f = :func:`~lcmkit.denoisers.consistency_fn` over the UNet (ω in the w-embedding), t_top the model's 1-step LCM
timestep, θ₀ a frozen copy of the starting UNet and d :func:`~lcmkit.losses.consistency_distance`. Then
:func:`lcmkit.train.optim.optimizer_step` (gradients averaged over processes, non-finite steps skipped, clipping,
AdamW, LR schedule). No EMA: the result is θ.

Output folder ``out/``: ``config.yaml``, ``pairs.safetensors``, ``checkpoints/step-N/`` (θ only: θ₀ is reloaded from
``--model``), ``logs/`` (the total loss, plus lines with ``top_loss`` and ``anchor_loss``), ``validation/step-N.png``
(rows: 1, 2, 4 LCM steps of θ; columns: prompts, fixed seeds), ``summary.json`` and
``pipeline/``: the input pipeline (same class and components, its ``LCMScheduler`` unchanged) with θ as its UNet.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import atomic_folder, atomic_write
from ..denoisers import TextConditioning, consistency_fn, has_w_embedding, unet_denoiser
from ..errors import LcmkitError
from ..losses import LOSS_TYPES, consistency_distance
from ..math.schedule import alpha_sigma, alphas_cumprod_from_config, append_dims
from ..math.timesteps import lcm_timesteps, training_grid
from .config import OptimConfig, TrainingOptions
from .data import DataSource, is_generated
from .finetune import freeze_frozen_parts
from .loop import Run
from .rng import generator_for
from .runtime import autocast, weight_dtype

PAIRS_FILE = "pairs.safetensors"
PARTS_FOLDER = "pairs.parts"          # each process's share of the pairs, until they are merged into PAIRS_FILE
RESULT_NAMES = ("pipeline", "summary.json", PAIRS_FILE, PARTS_FOLDER, "validation")
TEACHER_SOLVER, TEACHER_STEPS = "dpm-solver++", 25
#: tags of the pairs' generators: noise of pair i from generator_for(seed, NOISE_KEY, i), the captions' draw from
#: generator_for(seed, CAPTION_KEY)
NOISE_KEY, CAPTION_KEY = 0x9A125, 0xCA9
#: pairs solved per batch (the solutions do not depend on it beyond float round-off)
PAIR_CHUNK = 64


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RefineConfig(TrainingOptions):
    """Everything ``lcmkit refine`` reads. YAML keys and CLI flags have the same names (``-`` for ``_``)."""

    model: str = ""                   # full LCM pipeline folder (UNet with time_cond_proj_dim)
    out: str = ""                     # output folder
    teacher: str | None = None        # base pipeline: pairs are its DPM-Solver++ 25 solutions; None = own TCD
    omega: float = 6.5                # paper ω: the w-embedding's, and the teacher's CFG (guidance ω + 1)
    num_pairs: int = 12000
    pair_steps: int = 4               # TCD (γ = 0) steps of the self-made pairs (no --teacher)
    anchor_weight: float = 1.0        # weight of the rest-of-grid anchor to the starting model; 0 = top only
    loss: str = "huber"               # l2 or huber (pseudo-Huber)
    huber_c: float = 0.001
    # loop defaults of refine's own recipe, not the other recipes' (recorded in benchmarks/results/open/README.md)
    batch_size: int = 32
    max_steps: int = 4000
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=0,
                                                                                  lr_schedule="cosine"))

    def __post_init__(self):
        self.check_training(model_key="model")
        if self.teacher is not None:
            teacher = Path(self.teacher).expanduser()
            if teacher.is_file():  # a single-file checkpoint (lcmkit.single_file)
                from ..single_file import check_file

                check_file(teacher, str(self.teacher))
            elif not (teacher / "model_index.json").is_file():
                raise LcmkitError(f"teacher {teacher} is not a diffusers pipeline folder (no model_index.json); "
                                  "pass the base model the LCM was distilled from, or drop --teacher")
        if not (math.isfinite(self.omega) and self.omega >= 0):
            raise LcmkitError(f"omega must be a finite number >= 0 (paper ω = guidance_scale − 1), got {self.omega}")
        if not (math.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise LcmkitError(f"anchor_weight must be a finite number >= 0 (1 is the measured recipe; 0 = the top "
                              f"timestep only), got {self.anchor_weight}")
        if self.pair_steps < 1:
            raise LcmkitError(f"pair_steps must be >= 1 (TCD steps of the self-made pairs), got {self.pair_steps}")
        if self.num_pairs < self.batch_size:
            raise LcmkitError(f"num_pairs ({self.num_pairs}) must be >= batch_size ({self.batch_size})")
        if self.loss not in LOSS_TYPES:
            raise LcmkitError(f"loss must be one of {', '.join(LOSS_TYPES)}, got {self.loss!r}")
        if self.huber_c <= 0:
            raise LcmkitError(f"huber_c must be > 0 (0.001 is the reference), got {self.huber_c}")

    @property
    def pair_source(self) -> str:
        """What makes the pairs' solutions, as written in the pairs file and the summary."""
        return f"teacher {TEACHER_SOLVER}-{TEACHER_STEPS}" if self.teacher else f"self tcd-{self.pair_steps}"


# ---------------------------------------------------------------------------------------------------------------
# Models: θ (trained) and θ₀ (the frozen starting UNet)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RefineModels:
    pipe: object               # the LCM pipeline (text encoders, tokenizers, scheduler)
    student: torch.nn.Module   # θ
    frozen: torch.nn.Module    # θ₀: a copy of the starting UNet, eval, no gradients
    alphas_cumprod: Tensor     # (T,) float64, on the device
    prediction_type: str
    device: torch.device
    mixed_precision: str

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def checkpoint_weights(self) -> dict[str, dict[str, Tensor]]:
        return {"unet": self.student.state_dict()}

    @torch.no_grad()
    def load_weights(self, weights: dict[str, dict[str, Tensor]], path) -> None:
        if "unet" not in weights:
            raise LcmkitError(f"checkpoint {path} is not an lcmkit refine checkpoint (no unet weights)")
        self.student.load_state_dict(weights["unet"])


def build_models(cfg: RefineConfig, pipe, device: torch.device) -> RefineModels:
    """θ = the LCM's UNet (float32, trainable), θ₀ = a frozen copy; text encoders frozen in the weight dtype."""
    unet = pipe.unet
    if not has_w_embedding(unet):
        raise LcmkitError(f"{cfg.model} is not a full LCM (its UNet has no guidance embedding, time_cond_proj_dim); "
                          "lcmkit refine takes the output of lcmkit distill --mode full")
    freeze_frozen_parts(pipe, device, cfg.mixed_precision)
    student = unet.to(device, torch.float32).train().requires_grad_(True)
    frozen = copy.deepcopy(student).requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    alphas_cumprod = alphas_cumprod_from_config(pipe.scheduler.config).to(device)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    return RefineModels(pipe, student, frozen, alphas_cumprod, prediction_type, device, cfg.mixed_precision)


def lcm_grid(pipe, num_train_timesteps: int) -> tuple[int, int, Tensor]:
    """(original_inference_steps, the 1-step LCM timestep t_top, the grid points below it) of the LCM's scheduler."""
    original = int(pipe.scheduler.config.get("original_inference_steps", 50))
    top = lcm_timesteps(1, num_train_timesteps, original)[0]
    grid = training_grid(num_train_timesteps, num_train_timesteps // original)[:-1]
    return original, int(top), grid


# ---------------------------------------------------------------------------------------------------------------
# Pairs: (x_T, z0) made once, a share per process
# ---------------------------------------------------------------------------------------------------------------

def pair_captions(cfg: RefineConfig, resolution: int) -> list[str]:
    """``num_pairs`` captions drawn uniformly (with replacement) from the captions of ``--data``."""
    captions = DataSource(cfg, resolution).captions()
    if not captions:
        raise LcmkitError(f"data {cfg.data} has no captions; refine needs prompts")
    draws = torch.randint(0, len(captions), (cfg.num_pairs,), generator=generator_for(cfg.seed, CAPTION_KEY))
    return [captions[int(i)] for i in draws]


def pair_noise(cfg: RefineConfig, pipe, indices: range, resolution: int) -> Tensor:
    """x_T of pairs ``indices`` (float32, CPU): pair i from its own generator (seed, NOISE_KEY, i)."""
    from ..pipelines import initial_latents

    generators = [generator_for(cfg.seed, NOISE_KEY, i) for i in indices]
    return initial_latents(pipe, generators, resolution, resolution, torch.float32, "cpu")


def _load_teacher(cfg: RefineConfig, models: RefineModels):
    """The --teacher pipeline on the device (weight dtype), checked against the LCM."""
    from ..pipelines import load_pipeline, vae_scale_factor

    dtype = weight_dtype(cfg.mixed_precision)
    teacher = load_pipeline(cfg.teacher, device="cpu", dtype=None)
    if has_w_embedding(teacher.unet):
        raise LcmkitError(f"teacher {cfg.teacher} is a full LCM (its UNet has a guidance embedding); pass the base "
                          "model the LCM was distilled from, or drop --teacher to use the LCM's own TCD solutions")
    lcm = models.pipe
    if (teacher.unet.config.in_channels != lcm.unet.config.in_channels
            or vae_scale_factor(teacher) != vae_scale_factor(lcm)):
        raise LcmkitError(f"teacher {cfg.teacher} has another latent space than {cfg.model} (channels or VAE scale "
                          "factor differ)")
    ac = alphas_cumprod_from_config(teacher.scheduler.config)
    if ac.shape != models.alphas_cumprod.shape or not torch.allclose(ac, models.alphas_cumprod.cpu()):
        raise LcmkitError(f"teacher {cfg.teacher} has another noise schedule than {cfg.model}; its solutions would "
                          "solve another ODE")
    for module in (teacher.unet, getattr(teacher, "text_encoder", None), getattr(teacher, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval().to(models.device, dtype)
    return teacher, ac.to(models.device)


@torch.no_grad()
def make_pairs(cfg: RefineConfig, models: RefineModels, resolution: int, progress: bool,
               indices: range | None = None) -> dict:
    """Pairs ``indices`` (default all ``num_pairs``; noise, z0 float32 on CPU) and the metadata of the pairs file
    (every caption; ``start`` / ``stop`` of the share). Pair i depends only on i, not on the share it is made in."""
    from tqdm.auto import tqdm

    from ..pipelines import (
        encode_prompt,
        encode_unconditional,
        sample_teacher,
        teacher_scheduler,
        teacher_timesteps,
    )
    from ..solvers import sample_tcd

    captions = pair_captions(cfg, resolution)
    indices = range(cfg.num_pairs) if indices is None else indices
    T = len(models.alphas_cumprod)
    original, _, _ = lcm_grid(models.pipe, T)
    device = models.device
    if cfg.teacher:
        teacher, teacher_ac = _load_teacher(cfg, models)
        teacher_pt = teacher.scheduler.config.get("prediction_type", "epsilon")
    else:
        tcd_steps = lcm_timesteps(cfg.pair_steps, T, original)
    noises, solutions = [], []
    for lo in tqdm(range(indices.start, indices.stop, PAIR_CHUNK), desc=f"pairs ({cfg.pair_source})",
                   disable=not progress):
        chunk = captions[lo:min(lo + PAIR_CHUNK, indices.stop)]
        x = pair_noise(cfg, models.pipe, range(lo, lo + len(chunk)), resolution)
        if cfg.teacher:
            cond = encode_prompt(teacher, chunk, resolution, resolution)
            uncond = encode_unconditional(teacher, None, len(chunk), resolution, resolution, cond)
            den = unet_denoiser(teacher.unet, teacher_ac, cond, prediction_type=teacher_pt, uncond=uncond,
                                omega=cfg.omega)
            scheduler = teacher_scheduler(teacher, TEACHER_SOLVER)
            timesteps = teacher_timesteps(scheduler, TEACHER_STEPS, 1.0)
            z0 = sample_teacher(scheduler, den, x.to(device) * scheduler.init_noise_sigma, timesteps)
        else:
            cond = encode_prompt(models.pipe, chunk, resolution, resolution)
            den = unet_denoiser(models.frozen, models.alphas_cumprod, cond, prediction_type=models.prediction_type,
                                w_omega=cfg.omega)
            with autocast(device, cfg.mixed_precision):
                z0 = sample_tcd(den, x.to(device), tcd_steps, models.alphas_cumprod, gamma=0.0)
        noises.append(x)
        solutions.append(z0.float().cpu())
    if cfg.teacher:
        del teacher
    metadata = {"captions": json.dumps(captions), "source": cfg.pair_source, "omega": repr(float(cfg.omega)),
                "seed": str(cfg.seed), "num_pairs": str(cfg.num_pairs), "resolution": str(resolution),
                "model": str(cfg.model), "teacher": str(cfg.teacher or ""),
                "start": str(indices.start), "stop": str(indices.stop)}
    return {"noise": torch.cat(noises), "z0": torch.cat(solutions), "metadata": metadata}


def share(num_pairs: int, rank: int, world_size: int) -> range:
    """The contiguous pair indices process ``rank`` of ``world_size`` makes (sizes differ by at most one)."""
    return range(num_pairs * rank // world_size, num_pairs * (rank + 1) // world_size)


def make_pairs_file(cfg: RefineConfig, models: RefineModels, resolution: int, out: Path, accelerator) -> float | None:
    """``out/pairs.safetensors``, made once and shared by every process: each makes its :func:`share` into
    ``out/pairs.parts/`` (atomically; a part already there from a killed run is kept), then the main process merges
    the parts. Returns the seconds it took (None: the file was there already, e.g. on a resume). The processes wait
    for each other only after equal shares, so the wait stays short however slow the solver is."""
    pairs_path, parts = out / PAIRS_FILE, out / PARTS_FOLDER
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if pairs_path.is_file():
        if accelerator.is_main_process and parts.exists():  # killed after the merge, before the clean-up
            shutil.rmtree(parts)
        accelerator.wait_for_everyone()
        return None
    if cfg.num_pairs < world_size:
        raise LcmkitError(f"num_pairs ({cfg.num_pairs}) must be at least the number of processes ({world_size})")
    t0 = time.perf_counter()
    mine = parts / f"part-{rank:03d}-of-{world_size:03d}.safetensors"
    if not _part_matches(mine, cfg, resolution, share(cfg.num_pairs, rank, world_size)):
        parts.mkdir(parents=True, exist_ok=True)
        write_pairs(mine, make_pairs(cfg, models, resolution, cfg.progress and accelerator.is_main_process,
                                     share(cfg.num_pairs, rank, world_size)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors.torch import load_file

        files = [parts / f"part-{r:03d}-of-{world_size:03d}.safetensors" for r in range(world_size)]
        loaded = [load_file(str(f)) for f in files]
        metadata = _metadata(files[0])
        metadata.update(start="0", stop=str(cfg.num_pairs))
        write_pairs(pairs_path, {"noise": torch.cat([t["noise"] for t in loaded]),
                                 "z0": torch.cat([t["z0"] for t in loaded]), "metadata": metadata})
        shutil.rmtree(parts)
    accelerator.wait_for_everyone()
    return time.perf_counter() - t0


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _part_matches(path: Path, cfg: RefineConfig, resolution: int, indices: range) -> bool:
    """Whether ``path`` is a finished part of this run's pairs with these indices (parts are written atomically)."""
    if not path.is_file():
        return False
    try:
        meta = _metadata(path)
    except Exception:  # an unreadable part is made again
        return False
    want = {**_settings(cfg, resolution), "start": str(indices.start), "stop": str(indices.stop)}
    return all(meta.get(key) == value for key, value in want.items())


def _settings(cfg: RefineConfig, resolution: int) -> dict[str, str]:
    """The settings a pairs file records and a run must share to use it."""
    return {"source": cfg.pair_source, "omega": repr(float(cfg.omega)), "seed": str(cfg.seed),
            "num_pairs": str(cfg.num_pairs), "resolution": str(resolution)}


def write_pairs(path: Path, pairs: dict) -> None:
    """The pairs file, written atomically (:func:`lcmkit.atomic.atomic_write`)."""
    from safetensors.torch import save_file

    tensors = {"noise": pairs["noise"].contiguous(), "z0": pairs["z0"].contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=pairs["metadata"]))


def read_pairs(path: Path, cfg: RefineConfig, resolution: int) -> tuple[Tensor, Tensor, list[str]]:
    """(noise, z0, captions) of a pairs file; refuses one made with other settings than this run's."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            noise, z0 = f.get_tensor("noise"), f.get_tensor("z0")
    except Exception as e:
        raise LcmkitError(f"pairs file {path} could not be read ({type(e).__name__}: {e}); delete it to make the "
                          "pairs again") from e
    for key, value in _settings(cfg, resolution).items():
        if meta.get(key) != value:
            raise LcmkitError(f"pairs file {path} was made with {key}={meta.get(key)}, this run has {value}; "
                              "resume with the same settings (or start a new --out)")
    captions = json.loads(meta["captions"])
    if not (len(captions) == noise.shape[0] == z0.shape[0] == cfg.num_pairs):
        raise LcmkitError(f"pairs file {path} is inconsistent ({len(captions)} captions, {noise.shape[0]} noises, "
                          f"{z0.shape[0]} solutions); delete it to make the pairs again")
    return noise, z0, captions


class PairText:
    """Text conditioning of pair captions: from a cache of every distinct caption (``cache``), else encoded per
    batch."""

    def __init__(self, pipe, captions: list[str], resolution: int, cache: bool):
        from ..pipelines import encode_prompt

        self.pipe, self.captions, self.resolution = pipe, captions, resolution
        self.table: TextConditioning | None = None
        if cache:
            distinct = sorted(set(captions))
            self.position = {c: j for j, c in enumerate(distinct)}
            with torch.no_grad():
                parts = [encode_prompt(pipe, distinct[i:i + PAIR_CHUNK], resolution, resolution)
                         for i in range(0, len(distinct), PAIR_CHUNK)]
            join = lambda vs: None if vs[0] is None else torch.cat(vs)  # noqa: E731
            self.table = TextConditioning(join([p.encoder_hidden_states for p in parts]),
                                          join([p.text_embeds for p in parts]), join([p.time_ids for p in parts]))

    @torch.no_grad()
    def __call__(self, indices: Tensor) -> TextConditioning:
        from ..pipelines import encode_prompt

        chosen = [self.captions[int(i)] for i in indices]
        if self.table is None:
            return encode_prompt(self.pipe, chosen, self.resolution, self.resolution)
        rows = torch.tensor([self.position[c] for c in chosen], device=self.table.encoder_hidden_states.device)
        pick = lambda v: None if v is None else v[rows]  # noqa: E731
        return TextConditioning(pick(self.table.encoder_hidden_states), pick(self.table.text_embeds),
                                pick(self.table.time_ids))


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------

def draw_batch(batch: int, num_pairs: int, grid: Tensor, shape: tuple, generator: torch.Generator
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Pair indices (B,), anchor timesteps t from ``grid`` (B,), ε (B, C, H, W): in that order, on CPU."""
    index = torch.randint(0, num_pairs, (batch,), generator=generator)
    t = grid[torch.randint(0, len(grid), (batch,), generator=generator)]
    noise = torch.randn((batch, *shape), generator=generator, dtype=torch.float32)
    return index, t, noise


def refine_loss(models: RefineModels, cfg: RefineConfig, x_T: Tensor, z0: Tensor, cond: TextConditioning,
                top: int, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(total, top term, anchor term) of one micro-batch; the anchor term is 0 (not computed) at weight 0. With
    the anchor on, θ runs once on [x_T; z_t] (batch 2B)."""
    device, ac = models.device, models.alphas_cumprod
    x_T, z0 = x_T.to(device), z0.to(device)
    batch = x_T.shape[0]
    top_t = torch.full((batch,), top, device=device, dtype=torch.long)
    anchored = cfg.anchor_weight > 0
    with autocast(device, models.mixed_precision):
        if anchored:
            t = t.to(device)
            a, s = (append_dims(v.float(), z0.ndim) for v in alpha_sigma(ac, t))
            z_t = a * z0 + s * noise.to(device)
            both = cond.cat(cond)
            f = consistency_fn(unet_denoiser(models.student, ac, both, prediction_type=models.prediction_type,
                                             w_omega=cfg.omega))
            out_top, out_anchor = f(torch.cat([x_T, z_t]), torch.cat([top_t, t])).chunk(2)
            with torch.no_grad():
                f0 = consistency_fn(unet_denoiser(models.frozen, ac, cond, prediction_type=models.prediction_type,
                                                  w_omega=cfg.omega))
                reference = f0(z_t, t)
            anchor = consistency_distance(out_anchor, reference, cfg.loss, cfg.huber_c)
        else:
            f = consistency_fn(unet_denoiser(models.student, ac, cond, prediction_type=models.prediction_type,
                                             w_omega=cfg.omega))
            out_top = f(x_T, top_t)
            anchor = torch.zeros((), device=device)
        top_term = consistency_distance(out_top, z0, cfg.loss, cfg.huber_c)
    return top_term + cfg.anchor_weight * anchor, top_term, anchor


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------

def save_pipeline(models: RefineModels, model_dir: str, folder: Path) -> None:
    """The input pipeline (same class, its own float32 components from disk, its scheduler unchanged) with θ."""
    from ..single_file import reload_pipeline

    unet = copy.deepcopy(models.student).to("cpu", torch.float32).eval()
    pipe = reload_pipeline(model_dir, unet=unet)  # a folder or a single-file checkpoint
    pipe.save_pretrained(str(folder), safe_serialization=True)


VALIDATION_STEPS = (1, 2, 4)


@torch.no_grad()
def validation_images(models: RefineModels, cfg: RefineConfig, prompts: list[str], resolution: int) -> list[list]:
    """LCM sampling (Algorithm 3) of the current θ: one row per step count in :data:`VALIDATION_STEPS`, one column
    per prompt, prompt i always from ``validation_seed`` + i."""
    from ..pipelines import decode_latents, encode_prompt, initial_latents, to_pil
    from ..solvers import sample_lcm

    T = len(models.alphas_cumprod)
    original, _, _ = lcm_grid(models.pipe, T)
    cond = encode_prompt(models.pipe, prompts, resolution, resolution).to(models.device)
    denoiser = unet_denoiser(models.student, models.alphas_cumprod, cond, prediction_type=models.prediction_type,
                             w_omega=cfg.omega)
    was_training = models.student.training
    models.student.eval()
    rows = []
    try:
        for n in VALIDATION_STEPS:
            gens = [torch.Generator(models.device).manual_seed(cfg.validation_seed + i) for i in range(len(prompts))]
            x = initial_latents(models.pipe, gens, resolution, resolution, torch.float32, models.device)
            with autocast(models.device, models.mixed_precision):
                z0 = sample_lcm(denoiser, x, lcm_timesteps(n, T, original), models.alphas_cumprod, gens)
            rows.append(to_pil(decode_latents(models.pipe, z0.float())))
    finally:
        models.student.train(was_training)
    return rows


class _NoDataPosition:
    """refine draws its pair indices from each step's generator: there is no data position to checkpoint."""

    def state(self) -> tuple[int, int]:
        return 0, 0

    def restore(self, epoch: int, position: int) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

def _setup(cfg: RefineConfig, device: torch.device):
    """LCM pipeline + models + resolution + (t_top, grid), for :func:`refine` (and the tests' fixed-draw losses)."""
    from ..pipelines import load_pipeline, vae_scale_factor

    pipe = load_pipeline(cfg.model, device="cpu", dtype=None)
    models = build_models(cfg, pipe, device)
    _, top, grid = lcm_grid(pipe, len(models.alphas_cumprod))
    factor = vae_scale_factor(pipe)
    resolution = cfg.resolution or models.student.config.sample_size * factor
    if resolution % factor:
        raise LcmkitError(f"resolution {resolution} is not a multiple of the VAE scale factor {factor}")
    return pipe, models, resolution, top, grid


def refine(cfg: RefineConfig) -> Path:
    """Run one-step refinement; returns ``out/pipeline``."""
    run = Run.start(cfg, cfg.out, RESULT_NAMES, "lcmkit refine")
    device, out = run.device, Path(cfg.out)
    pipe, models, resolution, top, grid = _setup(cfg, device)
    run.record_config({"resolution": resolution, "top_timestep": top,
                       "anchor_timesteps": [int(grid[0]), int(grid[-1])], "pair_source": cfg.pair_source})

    # the pairs: made once, a share per process (kept for a resume), then read by every process
    pair_seconds = make_pairs_file(cfg, models, resolution, out, run.accelerator)
    noise, z0, captions = read_pairs(out / PAIRS_FILE, cfg, resolution)
    cache_text = cfg.cache_text if cfg.cache_text is not None else is_generated(cfg.data)
    text = PairText(pipe, captions, resolution, cache_text)
    # validation grids: --validation-prompts, else the first (≤ 4) distinct pair captions, the same on every run
    validation_prompts = list(cfg.validation_prompts) or list(dict.fromkeys(captions))[:4]
    position = _NoDataPosition()
    run.optimise(models.trainable(), {"pair_source": cfg.pair_source}, models.load_weights, position)

    parts: dict[str, list[float]] = {"top": [], "anchor": []}
    top_losses, anchor_losses = [], []

    def micro_loss(step: int, micro: int) -> Tensor:
        """The refine loss of one micro-batch: the draws (pairs, t, ε) of (seed, step, micro, rank)."""
        index, t, eps = draw_batch(cfg.batch_size, len(captions), grid, tuple(noise.shape[1:]),
                                   generator_for(cfg.seed, step, micro, run.rank))
        total, top_term, anchor = refine_loss(models, cfg, noise[index], z0[index], text(index).to(device), top,
                                              t, eps)
        parts["top"].append(float(top_term.detach()))
        parts["anchor"].append(float(anchor.detach()))
        return total

    def log_terms(outcome) -> dict:
        """The step's two loss terms (means over its micro-batches), kept for the summary and the log lines."""
        top_losses.append(sum(parts["top"]) / len(parts["top"]))
        anchor_losses.append(sum(parts["anchor"]) / len(parts["anchor"]))
        parts["top"].clear()
        parts["anchor"].clear()
        return {"top_loss": top_losses[-1], "anchor_loss": anchor_losses[-1]}

    run.train(micro_loss, desc="refine", checkpoint_weights=models.checkpoint_weights, position=position,
              after_step=log_terms, checkpoint_extra={"pair_source": cfg.pair_source},
              validate=lambda: validation_images(models, cfg, validation_prompts, resolution))

    result = out / "pipeline"

    def write_result(folder: Path) -> None:
        save_pipeline(models, cfg.model, folder)
        run.write_config(folder)

    run.finish(result, lambda: atomic_folder(result, write_result), num_pairs=len(captions),
               pair_source=cfg.pair_source, pairs_made_seconds=pair_seconds, omega=cfg.omega,
               anchor_weight=cfg.anchor_weight, top_timestep=top, top_losses=top_losses, anchor_losses=anchor_losses)
    return result
