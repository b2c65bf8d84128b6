"""What ``generate`` accepts, importable without torch: the sampler and dtype names and the argument checks.

The command line uses these names as its choices and calls :func:`check_generate_args` before any model is loaded;
:func:`lcmkit.pipelines.generate` calls the same function, so the library and the CLI refuse the same inputs with the
same messages.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

from .errors import LcmkitError

#: few-step consistency samplers (``lcmkit.solvers.SAMPLERS``)
CONSISTENCY_SAMPLERS = ("lcm", "tcd")
#: teacher baselines: diffusers' schedulers driven by lcmkit's loop
TEACHER_SAMPLERS = ("ddim", "dpm-solver", "dpm-solver++")
SAMPLER_NAMES = CONSISTENCY_SAMPLERS + TEACHER_SAMPLERS
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LcmkitError(f"{name} must be a positive integer, got {value!r}")


def check_generate_args(*, steps=4, guidance=1.0, num_images=1, sampler="lcm", eta=0.3, strength=1.0,
                        init_image=None, height=None, width=None) -> None:
    """Refuse values ``generate`` cannot honour, each with a message that says how to fix it.

    ``init_image`` is checked when it is a path (it must be a file); ``height`` / ``width`` when given (positive;
    the multiple of the VAE scale factor is checked once the model is known)."""
    _positive_int("steps", steps)
    _positive_int("num_images", num_images)
    if sampler not in SAMPLER_NAMES:
        raise LcmkitError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLER_NAMES)}")
    if not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) or guidance < 0:
        raise LcmkitError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise LcmkitError(f"eta (TCD gamma) must be in [0, 1], got {eta!r}")
    if not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
        raise LcmkitError(f"strength must be in (0, 1], got {strength!r}")
    if init_image is None and strength != 1.0:
        raise LcmkitError("strength is for image-to-image; pass an init image too")
    if isinstance(init_image, (str, Path)) and not Path(init_image).is_file():
        raise LcmkitError(f"init image {init_image} not found")
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            _positive_int(name, value)


def check_size(height: int, width: int, factor: int) -> None:
    """Both sides positive multiples of the VAE scale factor ``factor``."""
    for name, v in (("height", height), ("width", width)):
        if v < factor or v % factor:
            raise LcmkitError(f"{name} must be a positive multiple of {factor} (the VAE scale factor), got {v}")
