"""lcmkit: Latent Consistency Models and LCM-LoRA for Stable-Diffusion-family models.

The math lives in :mod:`lcmkit.math` (pure functions), the teacher solvers and few-step samplers in
:mod:`lcmkit.solvers`, the diffusers-UNet adapters in :mod:`lcmkit.denoisers`.
"""

__version__ = "0.1.0"
