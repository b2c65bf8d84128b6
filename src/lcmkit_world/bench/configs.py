"""Stable Diffusion 1.5, SDXL and a tiny stand-in, written out as configs and built with random weights.

Nothing is downloaded: the configs below are the published architectures' shapes (diffusers/transformers
argument names), and the weights are random. Speed and memory do not depend on the weights' values, so a
random SD 1.5 UNet is as slow as the real one.

- ``sd15``: UNet 320/640/1280/1280, 2 layers per block, cross-attention 768 (CLIP ViT-L/14 text encoder, 12
  layers, width 768), 4-channel VAE 128/256/512/512; 512² images, 64² latents.
- ``sdxl``: UNet 320/640/1280 with 1/2/10 transformer layers, cross-attention 2048 = CLIP ViT-L (768) +
  OpenCLIP bigG (1280, 32 layers), text-time added conditioning; the same VAE shape; 1024² images, 128² latents.
- ``ssd1b``: SSD-1B, SDXL's UNet with 2/4 transformer layers in the down blocks, [4, 4, 10] / [2, 1, 1] in the up
  blocks and no middle-block attention (source beside :data:`SSD1B`); SDXL's VAE and text encoders.
- ``tiny``: the same code path on a model that runs in milliseconds (for ``--smoke`` and the tests).

The tokenizer is a byte-level CLIP tokenizer (every character a token, ids < 520): real CLIP BPE merges cannot be
downloaded, and token ids only need to fit the embedding table for timing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

#: the SD 1.x/2.x/SDXL teacher schedule (docs/reference.md, Noise schedule)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
#: width of the full LCM's guidance embedding (``time_cond_proj_dim``)
W_EMBEDDING_DIM = 256

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build one pipeline family with random weights."""

    name: str
    resolution: int                      # pixels (square)
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]      # one (SD) or two (SDXL; the second has a projection)
    max_tokens: int = 77
    sdxl: bool = False
    notes: dict = field(default_factory=dict)


SD15 = Architecture(
    name="sd15", resolution=512,
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280),
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    vae=dict(SD_VAE, sample_size=512, scaling_factor=0.18215),
    text_encoders=(CLIP_L,),
)

SDXL = Architecture(
    name="sdxl", resolution=1024, sdxl=True,
    unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text_encoders=(CLIP_L, OPENCLIP_BIGG),
)

#: SSD-1B (Segmind's distilled SDXL): SDXL's UNet with fewer transformer layers, facts from ComfyUI's
#: ``comfy/model_detection.py`` (``SSD_1B``: ``transformer_depth`` [0, 0, 2, 2, 4, 4], ``transformer_depth_output``
#: [0, 0, 0, 1, 1, 2, 10, 4, 4] in level order, popped from the end for the up blocks, ``transformer_depth_middle`` −1:
#: a middle block of one ResBlock). In diffusers terms: 2 and 4 layers in the down blocks, up blocks [4, 4, 10] and
#: [2, 1, 1], ``mid_block_type="UNetMidBlock2D"`` (one resnet, no attention).
SSD1B = Architecture(
    name="ssd1b", resolution=1024, sdxl=True,
    unet=dict(SDXL.unet, transformer_layers_per_block=(1, 2, 4),
              reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1)), mid_block_type="UNetMidBlock2D"),
    vae=SDXL.vae, text_encoders=SDXL.text_encoders,
)

_TINY_TEXT = dict(vocab_size=520, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32, hidden_act="gelu", projection_dim=32)
TINY = Architecture(
    name="tiny", resolution=32,
    unet=dict(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             norm_num_groups=2, sample_size=32),
    text_encoders=(_TINY_TEXT,), max_tokens=32,
)

ARCHITECTURES = {a.name: a for a in (SD15, SDXL, SSD1B, TINY)}


def byte_tokenizer(max_length: int):
    """A CLIP tokenizer over the 256 byte-level symbols, no merges: ids 0 (BOS), 1 (EOS/pad), then 2 per byte."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def unet_config(arch: Architecture, full_lcm: bool = False) -> dict:
    """The UNet config; ``full_lcm`` adds the guidance embedding (``time_cond_proj_dim = 256``)."""
    return dict(arch.unet, time_cond_proj_dim=W_EMBEDDING_DIM) if full_lcm else dict(arch.unet)


@contextlib.contextmanager
def _seeded(seed: int):
    """Random init from a fixed seed without leaving the global RNG changed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_unet(arch: Architecture, full_lcm: bool = False, device: str | torch.device = "cpu", seed: int = 0):
    """A random-weight ``UNet2DConditionModel`` (``device="meta"``: shapes only, no memory, no init time)."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed), torch.device(device):
        return UNet2DConditionModel(**unet_config(arch, full_lcm)).eval()


def _text_encoder(config: dict, with_projection: bool, max_tokens: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**dict(config, max_position_embeddings=max(config["max_position_embeddings"], max_tokens)),
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def build_pipeline(arch: Architecture, seed: int = 0, full_lcm: bool = False):
    """A random-weight diffusers pipeline: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, or with
    ``full_lcm`` a ``LatentConsistencyModelPipeline`` (SD only) whose UNet takes the w-embedding."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    unet = build_unet(arch, full_lcm, seed=seed)
    with _seeded(seed + 1):
        vae = AutoencoderKL(**arch.vae).eval()
    with _seeded(seed + 2):
        encoders = [_text_encoder(c, with_projection=i == 1, max_tokens=arch.max_tokens)
                    for i, c in enumerate(arch.text_encoders)]
    tokenizer = byte_tokenizer(arch.max_tokens)
    if arch.sdxl:
        if full_lcm:
            raise ValueError("a full SDXL LCM has no diffusers pipeline class here; use LCM-LoRA for SDXL")
        scheduler = EulerDiscreteScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizer, tokenizer_2=byte_tokenizer(arch.max_tokens),
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True)
    elif full_lcm:
        scheduler = LCMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                 original_inference_steps=50, timestep_scaling=10.0)
        pipe = LatentConsistencyModelPipeline(unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    else:
        scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lcm_pipeline_from(pipe, unet):
    """A ``LatentConsistencyModelPipeline`` sharing ``pipe``'s VAE and text encoder around an LCM ``unet``."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50, timestep_scaling=10.0,
                                         set_alpha_to_one=True, clip_sample=False)
    lcm = LatentConsistencyModelPipeline(unet=unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                         tokenizer=pipe.tokenizer, scheduler=scheduler, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    return lcm


def lora_trainable_parameters(arch: Architecture, rank: int = 64, alpha: float = 64.0) -> dict:
    """Trainable parameters of LCM-LoRA (:func:`lcmkit.lora.lcm_lora_config`) on ``arch``'s UNet, built on the
    ``meta`` device (no memory, well under a second), and the UNet's own size for scale."""
    from lcmkit.lora import LCM_LORA_TARGETS, lcm_lora_config, lora_layers

    preset = "sdxl" if arch.sdxl else "sd"
    with torch.device("meta"):
        unet = build_unet(arch, device="meta")
        base = sum(p.numel() for p in unet.parameters())
        unet.requires_grad_(False)
        unet.add_adapter(lcm_lora_config(preset, rank, alpha))
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return {"architecture": arch.name, "rank": rank, "alpha": alpha, "preset": preset,
            "target_modules": list(LCM_LORA_TARGETS[preset]), "lora_layers": len(lora_layers(unet)),
            "trainable_params": trainable, "unet_params": base}


# ---------------------------------------------------------------------------------------------------------------
# Rectified-flow transformers: SD3.5-medium, SD3.5-large, FLUX.1-dev, random weights / meta device
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowArchitecture:
    """A flow transformer's published ``transformer/config.json`` (diffusers argument names) and its published
    size in parameters, for scale."""

    name: str
    model_class: str                     # diffusers class name
    transformer: dict
    published_params: float


#: ``stabilityai/stable-diffusion-3.5-medium`` transformer config: MMDiT-X, 24 blocks of 24 heads × 64 (1536),
#: the first 13 with a second image-only attention (``attn2``), RMS QK-norm, 384² position table. "2.5B".
SD35_MEDIUM = FlowArchitecture(
    name="sd3.5-medium", model_class="SD3Transformer2DModel", published_params=2.5e9,
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                     attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                     caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                     dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"))
#: ``stabilityai/stable-diffusion-3.5-large``: 38 blocks of 38 heads × 64 (2432 = caption_projection_dim), RMS
#: QK-norm, no dual attention, 192² position table. "8.1B".
SD35_LARGE = FlowArchitecture(
    name="sd3.5-large", model_class="SD3Transformer2DModel", published_params=8.1e9,
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                     attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                     caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                     dual_attention_layers=(), qk_norm="rms_norm"))
#: ``black-forest-labs/FLUX.1-dev``: 19 double-stream + 38 single-stream blocks of 24 heads × 128 (3072), 2×2
#: packed 16-channel latents (in_channels 64, patch 1), T5 4096 / CLIP pooled 768, guidance embedding,
#: RoPE axes 16/56/56. "12B" (11.9B).
FLUX1_DEV = FlowArchitecture(
    name="flux.1-dev", model_class="FluxTransformer2DModel", published_params=11.9e9,
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)))

FLOW_ARCHITECTURES = {a.name: a for a in (SD35_MEDIUM, SD35_LARGE, FLUX1_DEV)}


def build_transformer(arch: FlowArchitecture, device: str | torch.device = "meta", seed: int = 0):
    """``arch``'s transformer with random weights (``device="meta"``, the default: shapes only, no memory)."""
    import diffusers

    with _seeded(seed), torch.device(device):
        return getattr(diffusers, arch.model_class)(**arch.transformer).eval()


def flow_lora_trainable_parameters(arch: FlowArchitecture, rank: int = 64, alpha: float = 64.0) -> dict:
    """Trainable parameters of the flow LCM-LoRA (:func:`lcmkit.lora.flow_lora_config`) on ``arch``'s transformer,
    built on the ``meta`` device, and the transformer's own size beside its published one: ``transformer_params``
    (its parameters) and ``checkpoint_params`` (its state dict, what the published figure counts: SD3's persistent
    sin-cos position table, 384²·1536 = 226.5M numbers on SD3.5-medium, is a buffer, not a parameter)."""
    from lcmkit.lora import FLOW_LORA_TARGETS, flow_lora_config, flow_lora_preset, lora_layers

    with torch.device("meta"):
        model = build_transformer(arch)
        base = sum(p.numel() for p in model.parameters())
        stored = sum(t.numel() for t in model.state_dict().values())
        model.requires_grad_(False)
        model.add_adapter(flow_lora_config(model, rank, alpha))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    preset = flow_lora_preset(model)
    return {"architecture": arch.name, "rank": rank, "alpha": alpha, "preset": preset,
            "target_modules": list(FLOW_LORA_TARGETS[preset]), "lora_layers": len(lora_layers(model)),
            "trainable_params": trainable, "transformer_params": base, "checkpoint_params": stored,
            "published_params": arch.published_params}


if __name__ == "__main__":  # python -m lcmkit_world.bench.configs: the flow LCM-LoRA parameter table at rank 64
    for _arch in FLOW_ARCHITECTURES.values():
        _c = flow_lora_trainable_parameters(_arch)
        print(f"{_c['architecture']:13s} LoRA r{_c['rank']}: {_c['trainable_params'] / 1e6:7.1f}M in "
              f"{_c['lora_layers']} layers; transformer {_c['transformer_params'] / 1e9:.3f}B, checkpoint "
              f"{_c['checkpoint_params'] / 1e9:.3f}B "
              f"(published {_c['published_params'] / 1e9:.1f}B)")
