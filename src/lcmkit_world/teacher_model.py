"""The world teacher's components: a tiny Stable Diffusion made of real diffusers/transformers classes.

The same four components as Stable Diffusion 1.x, only small, so every code path that serves real SD (loading, CFG,
schedulers, distillation) also serves the built-in world: ``AutoencoderKL`` (32x32x3 pixels <-> 8x8x4 latents),
``CLIPTextModel`` with a word-level tokenizer saved as a standard fast tokenizer, ``UNet2DConditionModel`` with
cross-attention, and the DDPM ``scaled_linear`` schedule (beta 0.00085 -> 0.012, T = 1000, epsilon prediction).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lcmkit.atomic import atomic_folder
from lcmkit.errors import LcmkitError
from lcmkit_world import world
from lcmkit_world.teacher_config import TextConfig, UNetConfig, VaeConfig

#: Special tokens of the word-level tokenizer (CLIP's names, so SD-style code finds what it expects).
BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
#: Words outside the world's captions that later recipes may use (style fine-tunes); embeddings start random.
EXTRA_WORDS = ("filled", "outlined", "style")


# --------------------------------------------------------------------------------------------------------------
# Component configs and builders
# --------------------------------------------------------------------------------------------------------------
def world_vocabulary() -> list[str]:
    """Every word of the world's captions (sorted), then :data:`EXTRA_WORDS`."""
    words = sorted({w for prompt in world.all_prompts() for w in prompt.split(" ")})
    return words + [w for w in EXTRA_WORDS if w not in words]


def build_tokenizer(max_length: int = 16):
    """A word-level fast tokenizer that behaves like SD's CLIP tokenizer for world captions.

    Lower-cases, splits on whitespace, adds ``<|startoftext|>``/``<|endoftext|>`` and pads with ``<|pad|>`` to
    ``model_max_length`` when asked (``padding="max_length"``, as ``StableDiffusionPipeline`` does). Unknown words
    map to ``<|unk|>``. ``save_pretrained`` writes a standard ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([BOS, EOS, PAD, UNK, *world_vocabulary()])}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_length, padding_side="right",
    )


def build_vae(cfg: VaeConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, sample_size=world.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
    )


def build_text_encoder(cfg: TextConfig, tokenizer, with_projection: bool = False):
    """``CLIPTextModel`` over the tokenizer's vocabulary; with ``with_projection`` a ``CLIPTextModelWithProjection``
    (SD3's class: hidden states and a projected pooled embedding, taken at the first end-of-text token)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_length,
        projection_dim=cfg.hidden_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def load_kept_parts(root: Path):
    """``(tokenizer, vae)`` of the world teacher folder ``root`` (float32; safetensors only, however a weight file is
    reached): what a run started from it keeps."""
    from diffusers import AutoencoderKL
    from transformers import PreTrainedTokenizerFast

    from lcmkit.weight_files import check_pipeline_weights

    check_pipeline_weights(root, f"--init-from {root}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    return tokenizer, AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32, use_safetensors=True)


def build_unet(cfg: UNetConfig, latent_channels: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    attn = [i < cfg.attention_levels for i in range(n)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 4, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=down, up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_heads,  # diffusers: = head count
        norm_num_groups=cfg.norm_num_groups,
    )


def scheduler_config() -> dict:
    """The DDPM schedule SD 1.x trains with (reference section 1): scaled_linear 0.00085 -> 0.012, T = 1000, eps."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False,
        timestep_spacing="leading",
    )


def build_scheduler(kind: str = "dpm-solver++"):
    """The pipeline's default scheduler (``dpm-solver++``) or the training one (``ddpm``), same schedule."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    if kind == "ddpm":
        return DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"})
    if kind == "dpm-solver++":
        cfg = {k: v for k, v in scheduler_config().items() if k not in ("clip_sample", "set_alpha_to_one")}
        return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
    raise LcmkitError(f"unknown scheduler {kind!r}; expected ddpm or dpm-solver++")


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())




def save_pipeline(out_dir: Path, vae, text_encoder, tokenizer, unet, float16: tuple[str, ...] = ("vae",)) -> None:
    """Save a standard ``StableDiffusionPipeline`` folder (safetensors, no safety checker, DPM-Solver++).

    Components named in ``float16`` (diffusers models only: ``vae``, ``unet``) are stored in float16 to keep the
    folder small; diffusers loads them back as float32 unless the caller asks for another ``torch_dtype``.
    """
    import copy

    from diffusers import StableDiffusionPipeline

    if set(float16) - {"vae", "unet"}:
        raise LcmkitError(f"float16 storage is only for vae and unet, got {float16}")
    vae = copy.deepcopy(vae).to(torch.float16) if "vae" in float16 else vae
    unet = copy.deepcopy(unet).to(torch.float16) if "unet" in float16 else unet
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    atomic_folder(out_dir, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
