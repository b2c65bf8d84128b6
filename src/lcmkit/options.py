"""What ``generate`` accepts, importable without torch: the sampler and dtype names, the argument checks and the
memory a batch needs.

The command line uses these names as its choices and calls :func:`check_generate_args` before any model is loaded;
:func:`lcmkit.pipelines.generate` calls the same function, so the library and the CLI refuse the same inputs with the
same messages. Once the model is loaded, :func:`images_per_batch` refuses a size whose memory cannot be had, before
anything is allocated for it, and picks how many images go through the model together.
"""

from __future__ import annotations

import math
import numbers
import os
from contextlib import contextmanager

from .errors import LcmkitError
from .inputs import MAX_IMAGE_BYTES, check_text, check_user_file

#: few-step consistency samplers (``lcmkit.solvers.SAMPLERS``)
CONSISTENCY_SAMPLERS = ("lcm", "tcd")
#: teacher baselines: diffusers' schedulers driven by lcmkit's loop
TEACHER_SAMPLERS = ("ddim", "dpm-solver", "dpm-solver++")
SAMPLER_NAMES = CONSISTENCY_SAMPLERS + TEACHER_SAMPLERS
#: samplers of flow-matching models (SD3, FLUX): the consistency sampler and the teacher's Euler / Heun
#: (``lcmkit.flow_solvers.FLOW_SAMPLERS``)
FLOW_SAMPLER_NAMES = ("lcm", "euler", "heun")
#: every name ``generate`` takes; which ones a model takes depends on its family (UNet or flow)
ALL_SAMPLER_NAMES = SAMPLER_NAMES + tuple(n for n in FLOW_SAMPLER_NAMES if n not in SAMPLER_NAMES)
DTYPE_NAMES = ("float32", "float16", "bfloat16")

#: Largest image side in pixels: 4× SDXL's native 1024. lcmkit decodes without tiling, so the VAE alone would need
#: tens of GiB beyond this, and the UNet's self-attention (quadratic in latent tokens) hours per step on a CPU.
MAX_SIDE = 4096
#: ``torch.Generator.manual_seed`` takes 0 … 2**64 − 1; image i uses seed + i, which must fit too.
MAX_SEED = 2**64 - 1
#: Largest guidance scale. Published settings stay below 20; far above, CFG's extrapolation (1 + ω)·ε_c − ω·ε_∅ makes
#: x̂0 = (x_t − σ_t·ε̂)/α_t (α_999 ≈ 0.07) overflow float16 and the image turns to NaN.
MAX_GUIDANCE = 100.0


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LcmkitError(f"{name} must be a positive integer, got {value!r}")


def check_generate_args(*, prompt=None, negative_prompt=None, steps=4, guidance=1.0, num_images=1, sampler="lcm",
                        eta=0.3, strength=1.0, init_image=None, height=None, width=None, seed=0,
                        batch_size=None) -> None:
    """Refuse values ``generate`` cannot honour, each with a message that says how to fix it.

    Prompts must be valid text (:func:`lcmkit.inputs.check_text`: undecodable command-line bytes are refused, not
    sent to the tokenizer). ``init_image`` is checked when it is a path (a regular file of at most
    ``MAX_IMAGE_BYTES``); ``height`` / ``width`` when given (positive, at most :data:`MAX_SIDE`; the multiple of the
    VAE scale factor is checked once the model is known); ``seed`` … ``seed + num_images − 1`` must be seeds
    (0 … :data:`MAX_SEED`); ``guidance`` None stands for the model's default (resolved once it is loaded)."""
    if isinstance(prompt, str):
        check_text("prompt", prompt)
    elif isinstance(prompt, (list, tuple)):
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                check_text(f"prompt {i}", p)
    if negative_prompt is not None:
        check_text("negative prompt", negative_prompt)
    _positive_int("steps", steps)
    _positive_int("num_images", num_images)
    if batch_size is not None:
        _positive_int("batch_size", batch_size)
    if sampler not in ALL_SAMPLER_NAMES:
        raise LcmkitError(f"unknown sampler {sampler!r}; use one of {', '.join(ALL_SAMPLER_NAMES)}")
    if guidance is not None and (not isinstance(guidance, numbers.Real) or not math.isfinite(guidance)
                                 or not 0 <= guidance <= MAX_GUIDANCE):
        raise LcmkitError(f"guidance must be a finite number in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
    if not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise LcmkitError(f"eta (TCD gamma) must be in [0, 1], got {eta!r}")
    if not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
        raise LcmkitError(f"strength must be in (0, 1], got {strength!r}")
    if init_image is None and strength != 1.0:
        raise LcmkitError("strength is for image-to-image; pass an init image too")
    if isinstance(init_image, (str, os.PathLike)):
        check_user_file(init_image, "init image", MAX_IMAGE_BYTES)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            _positive_int(name, value)
            if value > MAX_SIDE:
                raise LcmkitError(f"{name} {value} is above the largest size lcmkit generates ({MAX_SIDE} pixels); "
                                  "generate at the model's native size and upscale")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise LcmkitError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(num_images, numbers.Integral) and seed + num_images - 1 > MAX_SEED:
        raise LcmkitError(f"seed {seed} is too large: image i uses seed + i, and seeds end at 2**64 - 1 = {MAX_SEED}")


def check_size(height: int, width: int, factor: int, what: str | None = None) -> None:
    """Both sides positive multiples of ``factor`` (``what`` it is; default the VAE scale factor), at most
    :data:`MAX_SIDE`."""
    for name, v in (("height", height), ("width", width)):
        if v < factor or v % factor:
            raise LcmkitError(f"{name} must be a positive multiple of {factor} ({what or 'the VAE scale factor'}), "
                              f"got {v}")
        if v > MAX_SIDE:
            raise LcmkitError(f"{name} {v} is above the largest size lcmkit generates ({MAX_SIDE} pixels)")


# --- memory ------------------------------------------------------------------------------------------------------

#: What a batch needs besides its images' activations (allocator slack, the timestep and guidance embeddings, ...).
FIXED_BYTES = 256 * 2**20


def image_bytes(*, height: int, width: int, factor: int, unet_channels: int, vae_channels: int, text_dim: int,
                cfg: bool, unet_bytes: int, vae_bytes: int) -> int:
    """Peak bytes one more image in the batch adds to ``generate``, beyond the loaded weights (rough, conservative).

    - **UNet** (one denoising step): about 60 tensors of C₀ = ``block_out_channels[0]`` channels on the latent grid
      (H/f)·(W/f) per image: the skip connections kept for the up path, resnet and transformer intermediates and the
      feed-forward's expansion at the first level; twice that under CFG (the unconditional half of the batch), plus
      the text conditioning (77 tokens × D). Self-attention is not counted quadratically: torch's
      ``scaled_dot_product_attention`` (diffusers' default processor) runs flash / memory-efficient kernels on CPU and
      CUDA, which never hold the tokens × tokens matrix.
    - **VAE decode** (after the UNet's activations are freed): about 4.5 tensors of the decoder's widest
      full-resolution stage (``vae_channels`` = max of its first two ``block_out_channels``: the last upsampling's
      input) plus 64 elements of per-pixel workspace, on the H·W grid; img2img's encode needs less.

    The peak is the larger of the two. With :data:`FIXED_BYTES` it lies above every peak measured on the CPU for
    SD 1.5 / SDXL shapes and the tests' tiny models (docs/reliability.md, "Sizes that cannot fit"), by 1.4–2.7× for
    the real shapes: it refuses only what cannot run.
    """
    latent = (height // factor) * (width // factor)
    per_unet_image = 60 * unet_channels * latent + 77 * text_dim
    unet = (2 if cfg else 1) * per_unet_image * unet_bytes
    vae = (4.5 * vae_channels + 64) * height * width * vae_bytes
    return int(max(unet, vae))


def images_per_batch(wanted: int, per_image: int, available: int | None, *, height: int, width: int,
                     where: str) -> int:
    """How many of ``wanted`` images go through the model together: all of them when the memory allows, fewer
    when not (the images do not change: each has its own generator), refused when not even one fits."""
    if available is None:
        return wanted
    if FIXED_BYTES + per_image > available:
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        raise LcmkitError(f"{height}x{width} needs about {gib(FIXED_BYTES + per_image)} for one image, more than the "
                          f"{gib(max(available, 0))} available on {where}; use a smaller --height/--width "
                          "(or free memory)")
    return max(1, min(wanted, (available - FIXED_BYTES) // per_image))


def batch_that_fits(pipe, wanted: int, height: int, width: int, factor: int, cfg: bool, device) -> int:
    """:func:`images_per_batch` for a loaded diffusers pipeline on ``device`` (an fp16 VAE with ``force_upcast``
    decodes in float32, as diffusers does)."""
    vae = pipe.vae
    upcast = str(vae.dtype) == "torch.float16" and getattr(vae.config, "force_upcast", False)
    per_image = image_bytes(height=height, width=width, factor=factor,
                            unet_channels=pipe.unet.config.block_out_channels[0],
                            vae_channels=max(vae.config.block_out_channels[:2]),
                            text_dim=pipe.unet.config.cross_attention_dim or 0, cfg=cfg,
                            unet_bytes=pipe.unet.dtype.itemsize, vae_bytes=4 if upcast else vae.dtype.itemsize)
    return images_per_batch(wanted, per_image, available_memory(device), height=height, width=width,
                            where=str(device))


@contextmanager
def out_of_memory_is_one_line(n: int, height: int, width: int, device):
    """An allocation that fails anyway (the estimate was too low) becomes one line, not an internal error."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator raises a plain one
        if type(e).__name__ != "OutOfMemoryError" and "allocate" not in str(e):
            raise
        raise LcmkitError(f"out of memory generating {n} image(s) of {height}x{width} on {device}; use a smaller "
                          "--height/--width or --batch-size") from e


def _read_ints(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """``key value`` lines of a /proc or cgroup file (first number after the key; missing file: {})."""
    try:
        with open(path) as f:
            lines = f.read(1 << 16).splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[0] in keys and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found


def _one_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit): None


def available_memory(device) -> int | None:
    """Bytes ``generate`` may still allocate on ``device``, or None when unknown (other devices and systems).

    CUDA: the device's free memory plus what torch's cache holds unused. CPU (Linux): the least of
    ``MemAvailable`` (/proc/meminfo), the cgroup's limit less its usage (page cache that can be dropped, the
    inactive files, not counted as used), and the process limits ``ulimit -v`` / ``-d`` less the process's size.
    """
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if kind != "cpu":
        return None
    limits = []
    meminfo = _read_ints("/proc/meminfo", ("MemAvailable",))
    if "MemAvailable" in meminfo:
        limits.append(meminfo["MemAvailable"] * 1024)
    for limit, usage, stat, inactive in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")):
        cap, used = _one_int(limit), _one_int(usage)
        if cap is not None and used is not None:
            limits.append(cap - used + _read_ints(stat, (inactive,)).get(inactive, 0))
    try:
        import resource

        status = _read_ints("/proc/self/status", ("VmSize", "VmData"))
        for rlimit, key in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
            soft = resource.getrlimit(rlimit)[0]
            if soft != resource.RLIM_INFINITY and key in status:
                limits.append(soft - status[key] * 1024)
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None
