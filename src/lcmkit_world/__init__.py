"""lcmkit's proving ground: a small text-to-image world on which every claim of lcmkit is shown end to end.

- :mod:`lcmkit_world.world`: the shapes world (renderer, captions, evaluation prompts), :mod:`.dataset` its
  training-data plug-in (``--data world``), :mod:`.export` its imagefolder / webdataset export;
- :mod:`lcmkit_world.teacher`: the world's teacher, a tiny Stable Diffusion trained by lcmkit's own training code;
- :mod:`lcmkit_world.evaluate`: the attribute classifier that judges generated images, and the metrics built on it;
- :mod:`lcmkit_world.bench`: the benchmark harness (the paper's Table 1, speed, distillation cost, style);
- :mod:`lcmkit_world.demo`: ``lcmkit demo``; :mod:`lcmkit_world.commands`: its ``lcmkit`` subcommands;
- ``assets/``: the shipped teachers and evaluator.

It imports lcmkit; lcmkit never imports it (it finds its commands and dataset through entry points).
"""
