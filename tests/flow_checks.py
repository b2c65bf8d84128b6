"""Test helpers shared by the flow-teacher recipe tests (SD3, FLUX): diffusers' own pipelines loaded from a tiny
folder, ``lcmkit generate`` through the command line with its PNGs read back, and the resume check of a short
distillation."""

from __future__ import annotations

import json

import numpy as np
import torch

from lcmkit.train.checkpoint import checkpoint_dirs, load_checkpoint
from lcmkit.train.distill import distill


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipeline(cls, folder, scheduler=None, **components):
    """``cls.from_pretrained(folder, **components)`` (SD3 without T5: ``text_encoder_3=None, tokenizer_3=None``),
    with ``scheduler`` (a class) built from the folder's scheduler config."""
    pipe = cls.from_pretrained(str(folder), **components)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return quiet(pipe)


def run_generate(args, capsys) -> tuple[int, str]:
    """``lcmkit generate ARGS``: (exit code, stderr)."""
    from lcmkit.cli import main

    capsys.readouterr()
    code = main(["generate", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def png_pixels(path) -> torch.Tensor:
    """A PNG's (H, W, 3) uint8 pixels."""
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.uint8).copy())


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    """diffusers' first (3, H, W) image in [0, 1] rounded to 8 bits as a PNG stores it."""
    return (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8)


def assert_resume_is_exact(make_cfg, teacher, tmp_path, **kw):
    """N steps straight == N/2, stop, resume, N/2 more: every checkpoint file, the data position, the losses of the
    resumed half and every result file bit for bit. Returns the two last checkpoints (straight, split)."""
    from safetensors.torch import load_file

    distill(make_cfg(teacher, tmp_path / "straight", **kw))
    distill(make_cfg(teacher, tmp_path / "split", stop_at=kw["max_steps"] // 2, **kw))
    distill(make_cfg(teacher, tmp_path / "split", resume=True, **kw))

    def same_files(a, b, names):
        for name in names:
            wa, wb = load_file(str(a / name)), load_file(str(b / name))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name

    a, b = (checkpoint_dirs(tmp_path / d)[-1] for d in ("straight", "split"))
    assert a.name == b.name == f"step-{kw['max_steps']:07d}"
    same_files(a, b, sorted(f.name for f in a.glob("*.safetensors")))
    sa, sb = (load_checkpoint(x)[1] for x in (a, b))
    assert torch.equal(sa["data"]["position"], sb["data"]["position"])
    la, lb = (json.loads((tmp_path / d / "summary.json").read_text())["losses"] for d in ("straight", "split"))
    assert la[kw["max_steps"] // 2:] == lb  # the resumed half reproduces the straight run's loss exactly
    result = tmp_path / "straight" / "lora"
    same_files(result, tmp_path / "split" / "lora", sorted(f.name for f in result.glob("*.safetensors")))
    return a, b
