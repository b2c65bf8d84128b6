"""Single-file checkpoints (``model.safetensors`` in the original LDM/SGM layout, how fine-tuned SD models are
shared) loaded as diffusers pipelines, offline, safetensors only (docs/single-file.md).

- **What the file is** is read from its own keys (:func:`inspect_file`): ``model.diffusion_model.*`` (the UNet),
  ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (CLIP ViT-L: SD 1.x), ``cond_stage_model.
  model.*`` (OpenCLIP ViT-H: SD 2.x), ``conditioner.embedders.0/1.*`` (SDXL base). Inpainting, pix2pix and upscaler
  UNets, the SDXL refiner and other model families are refused by name; a full LCM's kept guidance embedding
  (``…time_embed.cond_proj.weight``, :mod:`lcmkit.single_file_export`) is recognised.
- **The configs** come from ``--model-config``: a diffusers pipeline folder (with or without weights; components
  the file lacks are taken from its weights), or one lcmkit ships (``sd15``, ``sd21`` = SD 2.1 768 px
  v-prediction, ``sd21-base`` = 512 px epsilon, ``sdxl``: ``lcmkit/configs/``). Without one, the family's shipped
  configs; an SD 2.x file whose ModelSpec metadata does not say its prediction type is taken as ``sd21``
  (v-prediction, diffusers' default for SD 2.x files too).
- **The tokenizers** (CLIP's BPE vocabulary cannot be downloaded): from the config folder, else built from
  ``bpe_simple_vocab_16e6.txt.gz`` of an installed package that ships it (open_clip_torch, clip-anytorch; only the
  file is read, the package is not imported), else refused in one line asking for ``--model-config DIR``.
- **Conversion** is diffusers' own (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
  ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), each fed a dict: lcmkit reads the file with
  ``safetensors`` itself after checking its bytes, so ``torch.load`` is never reached (diffusers'
  ``from_single_file`` would ``torch.load`` a non-safetensors file). Models are built from their configs and loaded
  strictly: a missing or unexpected weight is an error naming it, never a silently random layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

from .errors import LcmkitError

#: configs lcmkit ships (lcmkit/configs/NAME: a diffusers pipeline folder without weights or tokenizers)
SHIPPED = ("sd15", "sd21", "sd21-base", "sdxl")
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
DEFAULT_CONFIG = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
#: packages known to ship CLIP's BPE merges, and the file's place inside each
BPE_FILES = (("open_clip", "bpe_simple_vocab_16e6.txt.gz"), ("clip", "bpe_simple_vocab_16e6.txt.gz"))
#: pad token of each tokenizer (published tokenizer configs: CLIP ViT-L pads with <|endoftext|>, OpenCLIP with "!")
PAD_TOKENS = {("sd1", "tokenizer"): "<|endoftext|>", ("sd2", "tokenizer"): "!",
              ("sdxl", "tokenizer"): "<|endoftext|>", ("sdxl", "tokenizer_2"): "!"}
TEXT_ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
W_EMBEDDING_KEY = "model.diffusion_model.time_embed.cond_proj.weight"
HINT = "pass --model-config DIR (a diffusers pipeline folder of this model's architecture)"

_config: contextvars.ContextVar[str | None] = contextvars.ContextVar("lcmkit_single_file_config", default=None)


@contextlib.contextmanager
def using_config(config: str | os.PathLike | None):
    """Within the block, single-file models load with ``config`` (a folder or a shipped name) unless a call names
    its own; the CLI wraps every command in it (``--model-config``). None: the family's shipped configs."""
    token = _config.set(None if config is None else str(config))
    try:
        yield
    finally:
        _config.reset(token)


def is_single_file(path: str | os.PathLike) -> bool:
    return Path(path).expanduser().is_file()


def check_model_path(model: str | os.PathLike, what: str) -> None:
    """A model a recipe starts from: a diffusers pipeline folder, or a safetensors single-file checkpoint (its
    bytes checked, nothing loaded). ``what`` names it in the messages (``teacher``, ``model``)."""
    path = Path(model).expanduser()
    if path.is_file():
        check_file(path, str(model))
        return
    if not path.is_dir():
        raise LcmkitError(f"{what} folder {path} not found; pass a diffusers pipeline folder (saved with "
                          "save_pretrained) or a .safetensors single-file checkpoint")
    if not (path / "model_index.json").is_file():
        raise LcmkitError(f"{what} {path} is not a diffusers pipeline folder (no model_index.json)")


def check_file(path: Path, name: str) -> None:
    """Refuse, before reading a tensor, a file that is not safetensors by name and by its first bytes."""
    from .pipelines import CONVERT_HINT, PICKLE_SUFFIXES, _safetensors_problem

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LcmkitError(f"{name} is a pickle checkpoint ({path.suffix}); lcmkit loads only safetensors because "
                          f"unpickling can run arbitrary code: {CONVERT_HINT}")
    if suffix != ".safetensors":
        raise LcmkitError(f"{name} is a file, not a diffusers pipeline folder or a .safetensors single-file "
                          "checkpoint")
    problem = _safetensors_problem(path)
    if problem:
        raise LcmkitError(f"{name} is refused: {problem}; lcmkit loads only safetensors because unpickling can run "
                          f"arbitrary code: {CONVERT_HINT}")


# ---------------------------------------------------------------------------------------------------------------
# What the file holds
# ---------------------------------------------------------------------------------------------------------------

class _Shape:
    """A tensor's shape, for diffusers' key-based model-type guess without reading any tensor."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def inspect_file(path: str | os.PathLike, name: str | None = None) -> dict:
    """{family, parts (unet/vae/text encoders present), full_lcm, prediction (from the metadata or None),
    metadata} of a single-file checkpoint, from its header only; an unrecognised file is refused saying why."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    name = name or str(path)
    check_file(path, name)
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            shapes = {k: _Shape(f.get_slice(k).get_shape()) for k in keys}
    except Exception as e:  # a header safetensors cannot parse
        raise LcmkitError(f"{name} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has("model.diffusion_model."):
        raise LcmkitError(f"{name} is not an SD-family single-file checkpoint: {_what_instead(keys, shapes)}")
    kind = _diffusers_guess(shapes)
    if kind not in (None, "v1", "v2", "xl_base"):
        raise LcmkitError(f"{name}: diffusers reads it as a {kind!r} checkpoint; lcmkit takes SD 1.x/2.x and SDXL "
                          "text-to-image models")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise LcmkitError(f"{name}: its UNet takes {conv_in.shape[1]} input channels (an inpainting, pix2pix or "
                          "upscaling model); lcmkit takes text-to-image UNets with 4 latent channels")
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        raise LcmkitError(f"{name} is an SDXL refiner (one OpenCLIP encoder, no CLIP ViT-L); lcmkit takes base models")
    if has("conditioner.embedders.1.model.") or has("model.diffusion_model.label_emb."):
        family = "sdxl"
    elif has("cond_stage_model.model."):
        family = "sd2"
    elif has("cond_stage_model.transformer."):
        family = "sd1"
    else:  # a UNet-only file: the cross-attention width tells SD 1.x (768) from SD 2.x (1024)
        width = next((s.shape[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
        family = {768: "sd1", 1024: "sd2"}.get(width)
        if family is None:
            raise LcmkitError(f"{name} holds a UNet but no text encoder, and its cross-attention width ({width}) "
                              f"names no family lcmkit knows; {HINT}")
    text = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model.",
            "sdxl": "conditioner.embedders.1.model."}[family]
    return {"family": family, "unet": True, "vae": has("first_stage_model.") or has("vae."),
            "text_encoder": has(text) and (family != "sdxl" or has("conditioner.embedders.0.transformer.")),
            "full_lcm": W_EMBEDDING_KEY in shapes, "prediction": _prediction_from(meta, keys), "metadata": meta}


def _diffusers_guess(shapes: dict) -> str | None:
    """diffusers' own model-type guess from the keys (``infer_diffusers_model_type``), None where it cannot say."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        return infer_diffusers_model_type(shapes)
    except Exception:  # a branch that wants tensor values: the checks of our own decide instead
        return None


def _what_instead(keys: list[str], shapes: dict) -> str:
    """Why a file without ``model.diffusion_model.*`` keys is not one: what its keys look like instead."""
    if any(k.startswith(("lora_unet_", "lora_te", "unet.")) and "lora" in k for k in keys):
        return "it is a LoRA file; apply it with --lora FILE"
    if any(k.startswith(("down_blocks.", "up_blocks.", "conv_in.")) for k in keys):
        return "it holds diffusers-named UNet weights (a component of a pipeline folder); pass the pipeline folder"
    kind = _diffusers_guess(shapes)
    if kind not in (None, "v1"):
        return f"diffusers reads it as a {kind!r} checkpoint; lcmkit takes SD 1.x/2.x and SDXL"
    tops = sorted({k.split(".")[0] for k in keys})[:4]
    return (f"no UNet in the original layout (model.diffusion_model.*); its keys start with {', '.join(tops) or '-'}")


def _prediction_from(meta: dict, keys: list[str]) -> str | None:
    """What the file says about its prediction type: ModelSpec metadata or a ``v_pred`` marker key."""
    value = str(meta.get("modelspec.prediction_type", "")).strip().lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if value in ("epsilon", "eps"):
        return "epsilon"
    if str(meta.get("modelspec.architecture", "")).endswith("-v") or "v_pred" in keys:
        return "v_prediction"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The configs
# ---------------------------------------------------------------------------------------------------------------

def resolve_config(info: dict, config: str | os.PathLike | None, name: str) -> tuple[Path, bool]:
    """(config folder, shipped?) for a file described by ``info``; a folder of another family is refused."""
    family = info["family"]
    if config is None:
        shipped = DEFAULT_CONFIG[family]
        if family == "sd2" and info["prediction"] == "epsilon":
            shipped = "sd21-base"
        return CONFIG_ROOT / shipped, True
    if str(config) in SHIPPED:
        folder, shipped = CONFIG_ROOT / str(config), True
    else:
        folder, shipped = Path(config).expanduser(), False
        if not (folder / "model_index.json").is_file():
            raise LcmkitError(f"--model-config {config} is neither a diffusers pipeline folder (no model_index.json) "
                              f"nor one of lcmkit's configs ({', '.join(SHIPPED)})")
    # the folder's family: SDXL's text-time conditioning, else SD 1.x / 2.x by the text encoder's width where it is
    # one of theirs (a small test model may have any width: its weights decide then)
    unet = _json(folder / "unet" / "config.json", name)
    width = _json(folder / "text_encoder" / "config.json", name).get("hidden_size") \
        if (folder / "text_encoder" / "config.json").is_file() else None
    theirs = "sdxl" if unet.get("addition_embed_type") == "text_time" else {768: "sd1", 1024: "sd2"}.get(width)
    if theirs is None and family != "sdxl":
        theirs = family
    if theirs != family:
        raise LcmkitError(f"{name} is an {FAMILY_NAMES[family]} checkpoint but --model-config {config} is "
                          f"{FAMILY_NAMES.get(theirs, 'another architecture')}; pass a config of the same family")
    return folder, shipped


def _json(path: Path, name: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LcmkitError(f"{name}: config {path} cannot be read ({type(e).__name__}: {e})") from e


def clip_bpe_file() -> Path | None:
    """CLIP's BPE merges (``bpe_simple_vocab_16e6.txt.gz``) as an installed package ships it, or None; the
    package is located, never imported."""
    import importlib.util

    for package, file in BPE_FILES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / file).is_file():
                return Path(folder) / file
    return None


def clip_tokenizer_from_bpe(bpe: str | os.PathLike, pad_token: str, max_length: int = 77):
    """A ``CLIPTokenizer`` from CLIP's gzipped BPE merges, built as CLIP's own tokenizer builds its vocabulary:
    the 256 byte symbols, the same with ``</w>``, one token per merge (the first 49152 − 256 − 2 merges), then
    ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens, the ids of openai/clip-vit-large-patch14."""
    import gzip

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1] if line.strip()]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=max_length,
                         pad_token=pad_token)


def _tokenizer(folder: Path, sub: str, family: str, name: str):
    from transformers import CLIPTokenizer

    if (folder / sub).is_dir():
        return CLIPTokenizer.from_pretrained(str(folder), subfolder=sub, local_files_only=True)
    bpe = clip_bpe_file()
    if bpe is None:
        raise LcmkitError(f"{name}: no CLIP tokenizer available offline (its vocabulary cannot be downloaded); pass "
                          "--model-config DIR, a diffusers pipeline folder of this family with tokenizer/ inside, or "
                          "install a package that ships CLIP's BPE file (pip install --no-deps open_clip_torch)")
    return clip_tokenizer_from_bpe(bpe, PAD_TOKENS[(family, sub)])


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def _strict_load(model, state: dict, what: str, name: str, source: str):
    """``state`` into ``model`` (built on the meta device) exactly: every weight present, none left over."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in expected)}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        parts = [f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else "",
                 f"{len(extra)} not in the model (e.g. {extra[0]})" if extra else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} in the file, "
                 f"{tuple(expected[wrong[0]].shape)} in the config)" if wrong else ""]
        raise LcmkitError(f"{name}: its {what} does not match {source}'s config: "
                          f"{'; '.join(p for p in parts if p)}; {HINT}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _empty(build):
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers real: filled by _strict_load
        return build()


def _unet(checkpoint: dict, folder: Path, info: dict, name: str, source: str):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = dict(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))
    w_embedding = checkpoint.get(W_EMBEDDING_KEY)
    # the file decides: a kept guidance embedding makes a full LCM, none a plain UNet (also one folded for one g)
    config["time_cond_proj_dim"] = None if w_embedding is None else int(w_embedding.shape[1])
    state = convert_ldm_unet_checkpoint(checkpoint, config)
    if w_embedding is not None:
        state["time_embedding.cond_proj.weight"] = w_embedding
    return _strict_load(_empty(lambda: UNet2DConditionModel.from_config(config)), state, "UNet", name, source)


def _vae(checkpoint: dict, folder: Path, name: str, source: str):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = AutoencoderKL.load_config(str(folder), subfolder="vae")
    state = convert_ldm_vae_checkpoint(checkpoint, config)
    return _strict_load(_empty(lambda: AutoencoderKL.from_config(config)), state, "VAE", name, source)


def _text_encoder(checkpoint: dict, folder: Path, sub: str, family: str, name: str, source: str):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(str(folder), subfolder=sub, local_files_only=True)
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in (config.architectures or []) \
        else CLIPTextModel
    model = _empty(lambda: cls(config))
    if family == "sd1" or (family == "sdxl" and sub == "text_encoder"):  # CLIP ViT-L, transformers' own names
        prefix = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
        state = convert_ldm_clip_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(prefix)})
    else:  # OpenCLIP: SD 2.x's encoder, SDXL's second
        prefix = "cond_stage_model.model." if family == "sd2" else "conditioner.embedders.1.model."
        state = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (no text_model.)
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return _strict_load(model, state, f"text encoder ({sub})", name, source)


def _from_folder(folder: Path, sub: str, what: str, name: str, shipped: bool):
    """A component the file lacks, from the config folder's own (safetensors) weights, or refused."""
    import importlib

    from .pipelines import check_pipeline_weights

    index = _json(folder / "model_index.json", name)
    library, cls = (index.get(sub) or [None, None])[:2]
    if shipped or library is None or not any((folder / sub).glob("*.safetensors")):
        raise LcmkitError(f"{name} holds no {what}; pass --model-config DIR, a diffusers pipeline folder whose "
                          f"{sub}/ has the weights")
    check_pipeline_weights(folder, str(folder))
    return getattr(importlib.import_module(library), cls).from_pretrained(str(folder), subfolder=sub,
                                                                         use_safetensors=True, local_files_only=True)


def _scheduler(folder: Path, info: dict, shipped: bool, full_lcm: bool):
    import diffusers

    config = dict(diffusers.DDIMScheduler.load_config(str(folder), subfolder="scheduler"))
    if shipped and info["prediction"] is not None:
        config["prediction_type"] = info["prediction"]
    if full_lcm and config.get("_class_name") != "LCMScheduler":  # lcmkit's full LCMs use LCMScheduler
        return diffusers.LCMScheduler.from_config(config, original_inference_steps=50, timestep_scaling=10.0,
                                                  set_alpha_to_one=True, clip_sample=False)
    return getattr(diffusers, config.get("_class_name", "DDIMScheduler")).from_config(config)


def load_single_file(path: str | os.PathLike, name: str | None = None, *, config: str | os.PathLike | None = None,
                     dtype=None):
    """A diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or, for a full LCM,
    ``LatentConsistencyModelPipeline``) from a single-file checkpoint, on the CPU in ``dtype`` (default
    float32). ``config``: as ``--model-config`` (default: :func:`using_config`'s, else the shipped ones)."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    from .pipelines import _quiet_loading

    path = Path(path).expanduser()
    name = name or str(path)
    info = inspect_file(path, name)
    folder, shipped = resolve_config(info, config if config is not None else _config.get(), name)
    source = f"lcmkit's {folder.name}" if shipped else str(folder)
    family = info["family"]
    with _quiet_loading():
        # the tokenizers first: a missing one is refused before gigabytes are read
        parts = {sub: _tokenizer(folder, sub, family, name)
                 for sub in ("tokenizer", "tokenizer_2")[:len(TEXT_ENCODERS[family])]}
        checkpoint = load_file(str(path))  # safetensors: no code runs; the bytes were checked above
        parts["unet"] = _unet(checkpoint, folder, info, name, source)
        parts["vae"] = _vae(checkpoint, folder, name, source) if info["vae"] else \
            _from_folder(folder, "vae", "VAE (first_stage_model.*)", name, shipped)
        for sub in TEXT_ENCODERS[family]:
            parts[sub] = _text_encoder(checkpoint, folder, sub, family, name, source) if info["text_encoder"] else \
                _from_folder(folder, sub, f"text encoder ({sub})", name, shipped)
        del checkpoint
        full_lcm = parts["unet"].config.time_cond_proj_dim is not None
        parts["scheduler"] = _scheduler(folder, info, shipped, full_lcm)
        if family == "sdxl":
            index = _json(folder / "model_index.json", name)
            pipe = diffusers.StableDiffusionXLPipeline(
                **parts, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
        else:
            cls = diffusers.LatentConsistencyModelPipeline if full_lcm else diffusers.StableDiffusionPipeline
            pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.to(torch.float32 if dtype is None else dtype)  # as from a folder: float32 unless asked otherwise
    return pipe


def reload_pipeline(source: str | os.PathLike, **replace):
    """The pipeline at ``source`` read again from disk in float32 (a folder: diffusers' ``from_pretrained``,
    safetensors only; a single file: :func:`load_single_file` with the current ``--model-config``), with the
    components in ``replace`` (``unet=…``, ``scheduler=…``) put in: how the recipes write their output pipelines."""
    from .pipelines import _quiet_loading

    if Path(source).expanduser().is_file():
        pipe = load_single_file(source)
        pipe.register_modules(**replace)
        return pipe
    from diffusers import DiffusionPipeline

    with _quiet_loading():
        return DiffusionPipeline.from_pretrained(str(source), use_safetensors=True, **replace)
