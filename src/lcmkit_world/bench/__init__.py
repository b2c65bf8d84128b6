"""Benchmarks: ``lcmkit bench speed | distill | memory | quality`` (see benchmarks/README.md).

- :mod:`.machine`   what machine and command produced a result; timing and JSON/Markdown helpers.
- :mod:`.hooks`     counting and timing UNet (and text encoder / VAE) forwards with forward hooks.
- :mod:`.configs`   SD 1.5 / SDXL / tiny architectures written out as configs, built with random weights.
- :mod:`.speed`     seconds per image and UNet evaluations, LCM vs teacher, lcmkit vs diffusers.
- :mod:`.distill`   seconds per distillation step split by phase, peak memory, LCM-LoRA parameter counts.
- :mod:`.memtrack`  one distillation step on fake (or real) tensors with every allocated byte counted by phase.
- :mod:`.memory`    GPU memory per setting (precision, optimizer, checkpointing, FSDP) and what fits 24/48/80 GB.
- :mod:`.quality`   the LCM paper's Table 1 and ablations on the built-in world.
"""
