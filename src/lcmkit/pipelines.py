"""Loading diffusers pipeline folders and generating images with lcmkit's samplers.

Supported folders: ``StableDiffusionPipeline`` (SD 1.x/2.x, epsilon or v prediction), ``StableDiffusionXLPipeline``
and ``LatentConsistencyModelPipeline`` (a full LCM: UNet with a guidance embedding), plus LCM-LoRA and style
LoRAs applied on the fly; ``generate`` also samples ``StableDiffusion3Pipeline`` and ``FluxPipeline`` (flow matching;
their conventions are in :mod:`lcmkit.flow_pipelines`). UNet sampling itself lives in :mod:`lcmkit.unet_sampling`.

Conventions (the ones a user sees):

- **guidance** is diffusers' ``guidance_scale`` g (default 1; a guidance-distilled FLUX transformer: 3.5, into its
  guidance embedding). The paper's ω = g − 1. A full LCM (``time_cond_proj_dim``)
  receives ω through its w-embedding and runs ONE forward per step: no negative prompt is possible there (it
  was distilled with "" as the unconditional prompt), so one is refused. Any other model runs real
  classifier-free guidance when g > 1 (base models, LCM-LoRA) and honours a negative prompt; with g ≤ 1 there
  is no unconditional branch, so a negative prompt is refused rather than silently ignored.
- **randomness**: image i uses its own ``torch.Generator`` seeded S + i; every draw for image i (initial latent,
  VAE posterior sample, per-step noise) comes from it, in diffusers' order, so image i does not depend on
  ``num_images`` and equals diffusers' pipelines called with ``generator=torch.Generator().manual_seed(S + i)``.
- **img2img strength** (``lcm``/``tcd``): LCM convention, as diffusers' ``LCMScheduler``: the 50-point
  distillation grid first shrinks to int(50·strength) points, then ``steps`` of them are chosen
  (4 steps at 0.8 → [799, 599, 399, 199]); you always get exactly ``steps`` steps. Teacher samplers
  (``ddim``, ``dpm-solver``, ``dpm-solver++``) use the usual SD img2img convention instead: the ``steps``-step
  schedule is truncated to its last int(steps·strength) steps (diffusers issue 7651 discusses the mismatch).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .denoisers import TextConditioning, architecture
from .errors import LcmkitError
from .inputs import load_image
from .math.schedule import alpha_sigma
from .options import (  # noqa: F401
    CONSISTENCY_SAMPLERS,
    DTYPE_NAMES,
    SAMPLER_NAMES,
    TEACHER_SAMPLERS,
    check_generate_args,
    check_size,
)
from .solvers import randn
from .unet_sampling import UnetSampling, sample_teacher, teacher_scheduler, teacher_timesteps  # noqa: F401
from .weight_files import (  # noqa: F401  (the checks of the weight files diffusers may open live there)
    CONVERT_HINT,
    PICKLE_SUFFIXES,
    _safetensors_problem,
    check_pipeline_weights,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" → cuda when available, else cpu; an unavailable cuda is an error, not a silent fallback."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LcmkitError("device cuda requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LcmkitError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    """Anything but ``org/name`` is taken for a local path (hub ids have exactly one slash)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1


def load_pipeline(model: str | os.PathLike, *, device: str | torch.device = "auto",
                  dtype: str | torch.dtype | None = None, flow: bool = False):
    """Load a diffusers pipeline folder (``model_index.json`` inside) onto ``device`` in ``dtype``.

    A hub id is only tried when ``HF_HUB_OFFLINE`` is not set; offline it fails at once, asking for a folder.
    Raises :class:`LcmkitError` for a missing folder, a folder that is not a pipeline, or a pipeline that is not
    Stable-Diffusion-family (UNet2DConditionModel + VAE + CLIP text encoder(s)); with ``flow`` an SD3 or FLUX
    pipeline (:mod:`lcmkit.flow_pipelines`) is accepted too.
    """
    from diffusers import DiffusionPipeline

    from .flow_pipelines import absent_components

    name = str(model)
    path = Path(name).expanduser()
    absent: dict = {}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LcmkitError(f"{name} is not a diffusers pipeline folder (no model_index.json); "
                              "pass a folder saved with save_pretrained")
        check_pipeline_weights(path, name)
        source = str(path)
        absent = absent_components(path)
    elif path.exists():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise LcmkitError(f"{name} is a pickle checkpoint ({path.suffix}); lcmkit loads only diffusers pipeline "
                              f"folders with safetensors weights because unpickling can run arbitrary code: {CONVERT_HINT}")
        # a single-file checkpoint, safetensors only (docs/single-file.md)
        from .single_file import load_single_file

        pipe = load_single_file(path, name, dtype=resolve_dtype(dtype))
        check_pipeline(pipe, name, flow)
        pipe.to(resolve_device(device))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    elif _hub_offline():
        raise LcmkitError(f"model folder {name} not found (HF_HUB_OFFLINE=1, so hub ids are not downloaded); "
                          "pass a local diffusers pipeline folder")
    elif _looks_like_path(name):
        raise LcmkitError(f"model folder {name} not found; pass a local diffusers pipeline folder")
    else:
        source = name  # a hub id, online
    try:
        with _quiet_loading():
            # use_safetensors: diffusers and transformers never fall back to a pickled .bin (checked above too)
            pipe = DiffusionPipeline.from_pretrained(source, dtype=resolve_dtype(dtype), use_safetensors=True,
                                                     **absent)
    except Exception as e:  # diffusers raises many types here; the user needs one line
        raise LcmkitError(f"could not load a diffusers pipeline from {name}: {type(e).__name__}: {e}") from e
    check_pipeline(pipe, name, flow)
    pipe.to(resolve_device(device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _quiet_loading():
    """No diffusers/transformers loading bars, log lines or warnings on stderr while loading (the CLI's stderr is
    for one-line errors: a failed load must not print diffusers' "An error occurred while trying to fetch ..."
    before lcmkit's line, which says the same); all restored after. ``LCMKIT_DEBUG=1`` keeps the logs."""
    import warnings

    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    states = [(m, m.is_progress_bar_enabled(), m.get_verbosity()) for m in (d_logging, t_logging)]
    for m, _, _ in states:
        m.disable_progress_bar()
        if not os.environ.get("LCMKIT_DEBUG"):
            m.set_verbosity(m.CRITICAL)
    try:
        with warnings.catch_warnings():
            if not os.environ.get("LCMKIT_DEBUG"):
                warnings.simplefilter("ignore")
            yield
    finally:
        for m, enabled, verbosity in states:
            m.set_verbosity(verbosity)
            if enabled:
                m.enable_progress_bar()


def check_pipeline(pipe, name: str = "pipeline", flow: bool = False) -> None:
    """Refuse pipelines lcmkit cannot drive (anything without a conditional UNet, a VAE and CLIP text encoders); an
    SD3 or FLUX pipeline only where ``flow`` says the caller drives flow models."""
    from diffusers import UNet2DConditionModel

    from .flow_pipelines import check_flow_pipeline, flow_family

    if flow_family(pipe) is not None:
        if not flow:
            raise LcmkitError(f"{name} is a flow-matching ({type(pipe).__name__}) pipeline; this command takes UNet "
                              "pipelines (SD 1.x/2.x, SDXL); lcmkit distill and generate take SD3 and FLUX")
        return check_flow_pipeline(pipe, name)

    missing = [c for c in ("unet", "vae", "scheduler", "tokenizer") if getattr(pipe, c, None) is None]
    if getattr(pipe, "text_encoder", None) is None and getattr(pipe, "text_encoder_2", None) is None:
        missing.append("text_encoder")
    if missing or not isinstance(pipe.unet, UNet2DConditionModel):
        raise LcmkitError(f"{name} ({type(pipe).__name__}) is not a Stable-Diffusion-family pipeline "
                          f"(missing {', '.join(missing) or 'a UNet2DConditionModel'})")


def is_sdxl(pipe) -> bool:
    return architecture(pipe.unet) == "sdxl"


def vae_scale_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoding
# ---------------------------------------------------------------------------------------------------------------

def _token_ids(tokenizer, prompts: list[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def _encoder_device(encoder) -> torch.device:
    return next(encoder.parameters()).device


def encode_prompt_sd(pipe, prompts: list[str]) -> TextConditioning:
    """SD 1.x/2.x: the last hidden state of the CLIP text encoder, (B, 77, D) (77 = tokenizer.model_max_length)."""
    tokens = _token_ids(pipe.tokenizer, prompts)
    device = _encoder_device(pipe.text_encoder)
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    hidden = pipe.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return TextConditioning(hidden.to(pipe.text_encoder.dtype))


def encode_prompt_sdxl(pipe, prompts: list[str], height: int, width: int) -> TextConditioning:
    """SDXL: penultimate hidden states of both encoders concatenated on D, pooled embeds of the last encoder
    (``CLIPTextModelWithProjection.text_embeds``), and time ids (original size, crop top-left, target size),
    each size as (height, width); no cropping, original = target."""
    pairs = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
             if t is not None and e is not None]
    states, pooled = [], None
    for tokenizer, encoder in pairs:
        out = encoder(_token_ids(tokenizer, prompts).input_ids.to(_encoder_device(encoder)),
                      output_hidden_states=True)
        if out[0].ndim == 2:  # (B, P): the projected pooled output; the last encoder's wins
            pooled = out[0]
        states.append(out.hidden_states[-2])
    hidden = torch.cat(states, dim=-1)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype, device=hidden.device)
    return TextConditioning(hidden, pooled, time_ids.expand(len(prompts), 6))


def encode_prompt(pipe, prompts: list[str], height: int, width: int) -> TextConditioning:
    return encode_prompt_sdxl(pipe, prompts, height, width) if is_sdxl(pipe) else encode_prompt_sd(pipe, prompts)


def encode_unconditional(pipe, negative_prompt: str | None, batch: int, height: int, width: int,
                         cond: TextConditioning) -> TextConditioning:
    """The CFG unconditional branch: the negative prompt, else "" (SD) or all zeros (SDXL with
    ``force_zeros_for_empty_prompt``, as diffusers and the SDXL LCM scripts do)."""
    if negative_prompt is None and is_sdxl(pipe) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return TextConditioning(torch.zeros_like(cond.encoder_hidden_states), torch.zeros_like(cond.text_embeds),
                                cond.time_ids)
    return encode_prompt(pipe, [negative_prompt or ""] * batch, height, width)


def _repeat(cond: TextConditioning, n: int) -> TextConditioning:
    """A batch-1 conditioning repeated to batch n (the text encoders run once per generate call)."""
    rep = lambda x: None if x is None else x.expand(n, *x.shape[1:]).contiguous()  # noqa: E731
    return TextConditioning(rep(cond.encoder_hidden_states), rep(cond.text_embeds), rep(cond.time_ids))


# ---------------------------------------------------------------------------------------------------------------
# Latents in and out
# ---------------------------------------------------------------------------------------------------------------

def initial_latents(pipe, generators: list[torch.Generator], height: int, width: int, dtype, device) -> Tensor:
    """x_T ~ N(0, I) of shape (B, C, H/f, W/f), element i from generator i (diffusers' ``prepare_latents``;
    LCM's ``init_noise_sigma`` is 1, so no scaling here)."""
    f = vae_scale_factor(pipe)
    shape = (len(generators), pipe.unet.config.in_channels, height // f, width // f)
    return randn(shape, generators, device, dtype)


def encode_image(pipe, image, generators: list[torch.Generator], height: int, width: int) -> Tensor:
    """z0 = scaling_factor · sample of the VAE posterior of ``image`` (SD3: less its ``shift_factor`` first), one
    sample per generator (B, C, H/f, W/f).

    As diffusers' LCM img2img pipeline: the posterior sample for element i is drawn from generator i before the
    forward-diffusion noise, so the same seed gives the same image.
    """
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)  # (1, 3, H, W) in [-1, 1]
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    z0 = torch.cat([posterior.sample(g) for g in generators])
    shift = getattr(vae.config, "shift_factor", None)  # SD3: z = (x − shift)·scaling_factor
    return vae.config.scaling_factor * (z0 if shift is None else z0 - shift)


def noise_to(z0: Tensor, t: int, alphas_cumprod: Tensor, generators: list[torch.Generator]) -> Tensor:
    """z_t = α_t·z0 + σ_t·ε (forward diffusion to the first timestep of an img2img run)."""
    eps = randn(z0.shape, generators, z0.device, z0.dtype)
    alpha, sigma = (v.to(z0.dtype) for v in alpha_sigma(alphas_cumprod, t))
    return alpha * z0 + sigma * eps


def decode_latents(pipe, z0: Tensor) -> Tensor:
    """VAE decode z0 / scaling_factor (SD3: + shift_factor) → images (B, 3, H, W) in [0, 1], float32 on cpu.

    An fp16 VAE with ``force_upcast`` (SDXL) decodes in float32, as diffusers does.
    """
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:  # SDXL-style latent normalisation
        view = lambda v: torch.tensor(v, device=z0.device, dtype=z0.dtype).view(1, -1, 1, 1)  # noqa: E731
        z = z0 * view(std) / vae.config.scaling_factor + view(mean)
    else:
        z = z0 / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None) is not None:  # SD3
            z = z + vae.config.shift_factor
    try:
        if upcast:
            vae.to(torch.float32)
        image = vae.decode(z.to(dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return (image.float() / 2 + 0.5).clamp(0, 1).cpu()


def to_pil(images: Tensor) -> list:
    """(B, 3, H, W) in [0, 1] → PIL images, rounded to 8 bits."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def save_grid(images: Sequence, path: str | os.PathLike, cols: int | None = None) -> Path:
    """Paste PIL images (same size) into a near-square grid, row-major, and save it to ``path``."""
    from PIL import Image

    if not images:
        raise LcmkitError("no images to put in a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    path = Path(path)
    grid.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# LoRA on the fly
# ---------------------------------------------------------------------------------------------------------------

def parse_lora(spec: str | os.PathLike | tuple) -> tuple[Path, float]:
    """``FILE[:WEIGHT]`` (or a (file, weight) pair) → (Path, weight); weight defaults to 1.0 and must be finite with
    |weight| ≤ :data:`lcmkit.lora_checks.MAX_LORA_WEIGHT` (NaN, inf or 1e30 would turn every image black)."""
    from .lora_checks import check_lora_weight

    if isinstance(spec, tuple):
        file, weight = spec
        return Path(file), check_lora_weight(weight, f"the weight of LoRA {file}")
    spec = str(spec)
    file, sep, weight = spec.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return Path(spec), 1.0  # a colon inside the path, no weight
        return Path(file), check_lora_weight(value, f"the weight of LoRA {file} ({spec!r})")
    return Path(spec), 1.0


def check_lora_file(path: str | os.PathLike) -> Path:
    """A LoRA file must exist and be safetensors, by name and by content (pickles are refused, never loaded)."""
    from .lora_formats import check_safetensors_file

    return check_safetensors_file(path)


def applied_loras(pipe, loras: Iterable, fuse: bool = True):
    """LoRAs (``FILE[:WEIGHT]`` specs or (file, weight) pairs) applied for the duration of a ``with`` block, the
    pipeline restored bit for bit afterwards: merged into the weights (θ_pre + Σ λ_i·(α_i/r_i)·up_i@down_i, the
    touched weights saved and copied back; no cost per step), or with ``fuse=False`` on the fly (forward hooks).

    Each file is converted key by key (kohya, PEFT, diffusers and mixed files; :mod:`lcmkit.lora_formats`): a key
    that matches no layer is an error naming it, never a silently dropped layer (diffusers decides the format
    from the first key only). Weighted sum of several LoRAs = task arithmetic, :mod:`lcmkit.task_arithmetic`.
    """
    from .task_arithmetic import apply_loras

    return apply_loras(pipe, [parse_lora(s) for s in loras], fuse=fuse)


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------

def generate(pipe_or_path, prompt: str | Sequence[str], *, negative_prompt: str | None = None, steps: int = 4,
             guidance: float | None = None, seed: int = 0, num_images: int = 1, height: int | None = None,
             width: int | None = None, sampler: str = "lcm", eta: float = 0.3, loras: Iterable = (),
             init_image=None, strength: float = 1.0, device: str | torch.device = "auto",
             dtype: str | torch.dtype | None = None, progress: bool = True, output_type: str = "pil",
             batch_size: int | None = None, fuse_loras: bool = True):
    """Generate ``num_images`` images for ``prompt``: a list of PIL images, or with ``output_type="np"`` a float
    array (B, H, W, 3) in [0, 1] before 8-bit rounding (diffusers' ``output_type="np"``).

    ``prompt`` may also be a list: image i then shows prompt i with seed S + i (``num_images`` is its length), so
    an evaluation can batch many prompts in one forward and image i still depends only on (prompt i, S + i).

    Args:
        pipe_or_path: a loaded diffusers pipeline or a pipeline folder (see :func:`load_pipeline`).
        guidance: diffusers' guidance_scale g (ω = g − 1). Full LCM: w-embedding of ω. Guidance-distilled FLUX
            (FLUX.1-dev): its guidance embedding of g (default 3.5). Otherwise real CFG (one batched forward of
            [negative; prompt]) when g > 1, conditional only when g ≤ 1. None: 1, or 3.5 on FLUX.1-dev.
        negative_prompt: used where CFG runs; refused (LcmkitError) where it cannot be honoured.
        seed: image i uses ``torch.Generator(device).manual_seed(seed + i)``.
        sampler: ``lcm`` (Algorithm 3), ``tcd`` (γ = ``eta``), or the teacher baselines ``ddim``, ``dpm-solver``,
            ``dpm-solver++`` (diffusers' schedulers, order 2 for DPM-Solver). SD3 and FLUX pipelines: ``lcm`` (the
            flow consistency sampler) or the teacher's ``euler`` / ``heun`` (:mod:`lcmkit.flow_pipelines`).
        loras: ``FILE[:WEIGHT]`` strings or (file, weight) pairs, applied only for this call: merged into the
            weights and restored bit for bit afterwards, or with ``fuse_loras=False`` added by forward hooks.
        init_image / strength: img2img; see the module docstring for the two strength conventions.
        height, width: pixels, multiples of the VAE scale factor (flow transformers: × 2); default the model's
            native size (:func:`native_size`).
        dtype: ``float32`` / ``float16`` / ``bfloat16``; None keeps the pipeline's (float32 when loading).
        batch_size: images per forward (default all); fewer where the memory estimate (:func:`lcmkit.options.image_bytes`)
            says they do not fit. Image i is the same whatever the batch (its own generator).
    """
    parts = list(generate_batches(**locals()))  # the arguments, as they were passed
    if output_type == "np":
        import numpy as np

        return np.concatenate(parts)
    return [image for part in parts for image in part]


def generate_batches(pipe_or_path, prompt, *, negative_prompt=None, steps=4, guidance=None, seed=0, num_images=1,
                     height=None, width=None, sampler="lcm", eta=0.3, loras=(), init_image=None, strength=1.0,
                     device="auto", dtype=None, progress=True, output_type="pil", batch_size=None, fuse_loras=True):
    """:func:`generate`'s images batch by batch, as they are made (the same arguments): each item is a list of PIL
    images (or an array), images ``k·B … k·B + B − 1`` of the ``k``-th batch. A caller that saves each batch
    before asking for the next holds one batch in memory, however many images are asked for."""
    from tqdm.auto import tqdm

    from .options import out_of_memory_is_one_line

    check_generate_args(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                        num_images=num_images, sampler=sampler, eta=eta, strength=strength, init_image=init_image,
                        height=height, width=width, seed=seed, batch_size=batch_size)
    if output_type not in ("pil", "np"):
        raise LcmkitError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    if isinstance(pipe_or_path, (str, os.PathLike)):
        pipe = load_pipeline(pipe_or_path, device=device, dtype=dtype, flow=True)
        device = denoising_model(pipe).device
    else:
        pipe = pipe_or_path
        check_pipeline(pipe, flow=True)
        model = denoising_model(pipe)
        device = model.device if str(device) == "auto" else resolve_device(device)
        # moving a pipeline walks every module (~15 ms even when nothing moves): only when something must
        if model.device != device or pipe.vae.device != device:
            pipe.to(device)
        if resolve_dtype(dtype) is not None and model.dtype != resolve_dtype(dtype):
            pipe.to(resolve_dtype(dtype))
    if not isinstance(prompt, str):
        prompts = list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise LcmkitError("prompt must be a string or a non-empty list of strings")
        if num_images not in (1, len(prompts)):
            raise LcmkitError(f"got {len(prompts)} prompts and num_images={num_images}; with a list of prompts "
                              f"each prompt makes one image")
        num_images = len(prompts)
        check_generate_args(num_images=num_images, seed=seed)
    else:
        prompts = None
    from .flow_pipelines import FlowSampling, default_guidance, flow_arch, flow_family

    flow = flow_family(pipe) is not None
    height = height if height is not None else native_size(pipe)
    width = width if width is not None else native_size(pipe)
    factor = vae_scale_factor(pipe)
    if flow:  # the latent's sides must be multiples of the patch (SD3) or of FLUX's 2×2 packing
        factor *= flow_arch(pipe).latent_multiple(pipe.transformer.config)
    check_size(height, width, factor, "the VAE scale factor × the transformer's patch" if flow else None)
    init_image = load_image(init_image, "init image")  # a regular file of at most 64 MiB, or a PIL image
    guidance = default_guidance(pipe) if guidance is None else guidance

    family = FlowSampling if flow else UnetSampling
    sampling = family(pipe, sampler=sampler, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                      strength=strength, init_image=init_image, height=height, width=width, device=device, eta=eta)
    with applied_loras(pipe, loras, fuse=fuse_loras):
        # the memory a batch needs (after fused LoRAs saved their weights): refused when not even one image fits
        batch = sampling.batch_that_fits(batch_size or num_images)
        with torch.inference_mode():
            sampling.encode_first([prompt] if prompts is None else prompts[:1])
        bar = tqdm(total=sampling.num_steps * math.ceil(num_images / batch),
                   desc=f"{sampler} {sampling.num_steps} steps", disable=not progress, leave=False)
        try:
            for start in range(0, num_images, batch):
                n = min(batch, num_images - start)
                with out_of_memory_is_one_line(n, height, width, device), torch.inference_mode():
                    images = sampling(prompt if prompts is None else prompts[start:start + n],
                                      [seed + start + i for i in range(n)], lambda i: bar.update(1))
                yield images.permute(0, 2, 3, 1).numpy() if output_type == "np" else to_pil(images)
        finally:
            bar.close()


def denoising_model(pipe):
    """The pipeline's denoiser: its UNet, or a flow pipeline's (SD3, FLUX) transformer."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def native_size(pipe) -> int:
    """The image side (pixels) a pipeline makes by default: the UNet's ``sample_size`` × the VAE scale factor, or
    the flow architecture's (:class:`lcmkit.flow_pipelines.FlowArch`; FLUX: 1024 as ``FluxPipeline``)."""
    from .flow_pipelines import flow_arch, flow_family

    if flow_family(pipe) is not None:
        return flow_arch(pipe).default_size(pipe)
    return pipe.unet.config.sample_size * vae_scale_factor(pipe)


def check_negative_prompt(negative_prompt: str | None, use_cfg: bool, guidance: float) -> None:
    if negative_prompt is not None and not use_cfg:
        raise LcmkitError(f"a negative prompt needs classifier-free guidance, which runs only with guidance > 1 "
                          f"(got {guidance}); raise guidance or drop the negative prompt")
