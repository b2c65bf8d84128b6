"""The models a benchmark runs on ("subjects"): the world teacher and its distilled models, or SD 1.5 / SDXL /
tiny architectures with random weights. Each subject has a teacher pipeline, a full LCM pipeline (w-embedding
UNet, sharing the teacher's VAE and text encoder) where the family has one, and an LCM-LoRA file.

A distilled model that is not given is replaced by a random stand-in of the right shape (the LCM UNet with
``time_cond_proj_dim = 256``, a rank-64 LCM-LoRA on the preset's layers): speed does not depend on the weights,
and ``weights`` in every result says which were trained and which random.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lcmkit.errors import LcmkitError
from lcmkit_world import world
from lcmkit_world.bench import configs

#: where the world teacher is shipped once trained
WORLD_TEACHER = world.shipped_teacher()
MODEL_NAMES = ("world", "sd15", "sdxl", "tiny")


@dataclass
class Subject:
    name: str
    teacher: object                  # diffusers pipeline (SD or SDXL)
    lcm: object | None               # LatentConsistencyModelPipeline, None for SDXL
    lora: Path                       # LCM-LoRA file (diffusers format)
    resolution: int
    weights: dict = field(default_factory=dict)
    merged: object | None = None     # the teacher with the LCM-LoRA merged into a copy (bench speed builds it)


def meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def random_lora_file(unet_config: dict, folder: Path, rank: int = 64, seed: int = 0, sdxl: bool = False) -> Path:
    """A random LCM-LoRA (:func:`lcmkit.lora.lcm_lora_config`, rank/alpha ``rank``) for a UNet of ``unet_config``,
    saved in diffusers' format. Shapes come from a ``meta`` UNet, so no UNet weights are allocated."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from lcmkit.lora import LORA_WEIGHT_NAME, lcm_lora_config

    config = lcm_lora_config("sdxl" if sdxl else "sd", rank, float(rank))
    unet = meta_unet(unet_config)
    with torch.device("meta"):
        unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    # small non-zero A and B, so the LoRA really changes the UNet's output (and no zero-skipping is possible)
    state = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in get_peft_model_state_dict(unet).items()}
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    folder.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(str(folder), unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME, safe_serialization=True,
                          unet_lora_adapter_metadata=metadata)
    return folder / LORA_WEIGHT_NAME


def random_lcm_unet(teacher_unet, seed: int = 0):
    """A random full-LCM UNet shaped like ``teacher_unet`` plus the guidance embedding (``time_cond_proj_dim``)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = configs.W_EMBEDDING_DIM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(config).eval()


def lora_file(path: str | Path, what: str = "LCM-LoRA") -> Path:
    """A LoRA ``.safetensors`` file, or the folder a training command wrote it into (``lora/`` of distill)."""
    from lcmkit.lora import LORA_WEIGHT_NAME

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise LcmkitError(f"{what} file {path} not found; pass a .safetensors file or a distill output lora/ folder")
    return path


def world_subject(work: Path, teacher: str | None = None, lcm: str | None = None, lora: str | None = None) -> Subject:
    from lcmkit.pipelines import load_pipeline, vae_scale_factor

    teacher_dir = Path(teacher) if teacher else WORLD_TEACHER
    if not (teacher_dir / "model_index.json").is_file():
        raise LcmkitError(f"world teacher not found at {teacher_dir} (it ships there once trained); "
                          "pass --world-teacher DIR, or bench sd15/sdxl/--smoke instead")
    pipe = load_pipeline(teacher_dir, device="cpu")
    weights = {"teacher": f"trained ({teacher_dir})"}
    if lcm:
        lcm_pipe = load_pipeline(lcm, device="cpu")
        weights["lcm"] = f"trained ({lcm})"
    else:
        lcm_pipe = configs.lcm_pipeline_from(pipe, random_lcm_unet(pipe.unet))
        weights["lcm"] = "random stand-in (teacher config + time_cond_proj_dim=256)"
    if lora:
        lora_path = lora_file(lora)
        weights["lora"] = f"trained ({lora_path})"
    else:
        lora_path = random_lora_file(dict(pipe.unet.config), work / "world-lora")
        weights["lora"] = "random stand-in (rank 64 LCM-LoRA preset)"
    resolution = pipe.unet.config.sample_size * vae_scale_factor(pipe)
    return Subject("world", pipe, lcm_pipe, lora_path, resolution, weights)


def random_subject(name: str, work: Path, seed: int = 0) -> Subject:
    """SD 1.5, SDXL or tiny with random weights (SDXL: no full LCM; its LCM is LCM-LoRA here)."""
    arch = configs.ARCHITECTURES[name]
    pipe = configs.build_pipeline(arch, seed=seed)
    lcm = None if arch.sdxl else configs.lcm_pipeline_from(pipe, configs.build_unet(arch, full_lcm=True, seed=seed + 3))
    lora = random_lora_file(arch.unet, work / f"{name}-lora", sdxl=arch.sdxl, seed=seed)
    weights = {"teacher": "random", "lcm": None if lcm is None else "random", "lora": "random (rank 64 preset)"}
    return Subject(name, pipe, lcm, lora, arch.resolution, weights)


def load_subject(name: str, work: Path, options) -> Subject:
    if name not in MODEL_NAMES:
        raise LcmkitError(f"unknown model {name!r}; use any of {', '.join(MODEL_NAMES)}")
    if name == "world":
        return world_subject(work, options.world_teacher, options.world_lcm, options.world_lora)
    return random_subject(name, work)


def describe(subject: Subject) -> dict:
    unet = subject.teacher.unet
    return {"resolution": subject.resolution, "weights": subject.weights,
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "latent_size": subject.resolution // 2 ** (len(subject.teacher.vae.config.block_out_channels) - 1)}
