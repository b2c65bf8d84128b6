"""Tiny random Stable-Diffusion-family pipelines for tests (no downloads, each built in well under 2 s).

Every builder returns a diffusers pipeline object and, given ``folder``, also saves it there with
``save_pretrained`` so tests can exercise the folder-loading path. Models are random but seeded, so two
builds with the same seed are identical.

- :func:`tiny_sd`      ``StableDiffusionPipeline``, epsilon or v prediction, DDIM-style scheduler config.
- :func:`tiny_lcm`     ``LatentConsistencyModelPipeline``: UNet with ``time_cond_proj_dim=256`` (w-embedding)
                       and an ``LCMScheduler``.
- :func:`tiny_sd2`     ``StableDiffusionPipeline`` in SD 2.x's shape: a 1024-wide text encoder (OpenCLIP ViT-H's
                       width, how lcmkit tells SD 2.x from 1.x), linear attention projections, v prediction.
- :func:`tiny_sdxl`    ``StableDiffusionXLPipeline``: two text encoders, pooled embeds + time ids.
- :func:`tiny_sd3`     ``StableDiffusion3Pipeline`` without T5 (flow matching, shift 3).
- :func:`tiny_flux`    ``FluxPipeline``: FLUX's packed 16-channel latents, CLIP (pooled) + T5 (tokens) with tokenizers
                       built here, guidance-embedded (dev) or not, dynamic-shift scheduler config.
- :func:`tiny_lora_file` a diffusers-format LoRA ``.safetensors`` for a tiny UNet, with non-zero B.
- :func:`torchrun_lcmkit` an ``lcmkit`` command in two processes under ``torchrun`` (gloo on CPU).

Sizes: UNet block_out_channels (32, 64), cross_attention_dim 32; VAE with four blocks of 8 channels so the
VAE scale factor is 8, as in real SD (a 64 px image is an 8x8 latent).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Tokens longer than this are truncated; short keeps the text encoders cheap.
MAX_TOKENS = 32
#: A T = 1000, scaled_linear beta schedule, as SD 1.x/2.x/SDXL use (docs/reference.md, Noise schedule).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tiny_tokenizer():
    """A CLIP BPE tokenizer over the 256 byte-level symbols (no merges): every character is a token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def tiny_text_encoder(seed: int = 0, with_projection: bool = False, hidden_size: int = 32):
    """A 2-layer CLIP text encoder whose token ids match :func:`tiny_tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=520, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, projection_dim=32, hidden_act="gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(seed: int = 0):
    """AutoencoderKL with four 8-channel blocks: scale factor 8, 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=2, sample_size=64,
    ).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, **extra):
    """UNet2DConditionModel with two levels (32, 64 channels), one cross-attention level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8, **extra,
    ).eval()


def _save(pipe, folder):
    if folder is not None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def tiny_sd(folder: str | Path | None = None, prediction_type: str = "epsilon", seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (SD 1.x layout) with a DDIM scheduler config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(seed), vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2),
        tokenizer=tiny_tokenizer(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, folder)


def tiny_sd2(folder: str | Path | None = None, prediction_type: str = "v_prediction", seed: int = 0):
    """A tiny SD 2.x-shaped ``StableDiffusionPipeline``: text encoder of width 1024 (SD 2.x's OpenCLIP ViT-H; two
    layers), UNet cross-attention 1024 with linear ``proj_in``/``proj_out`` (``use_linear_projection``, as SD 2.x),
    DDIM config with ``prediction_type`` (SD 2.1 768: v; 2.1-base: epsilon)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(seed, cross_attention_dim=1024, use_linear_projection=True), vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(seed + 2, hidden_size=1024), tokenizer=tiny_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, folder)


def tiny_lcm(folder: str | Path | None = None, seed: int = 0):
    """A tiny full LCM: ``LatentConsistencyModelPipeline`` whose UNet takes the w-embedding (d = 256)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    unet = tiny_unet(seed, time_cond_proj_dim=256)
    scheduler = LCMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                             original_inference_steps=50, timestep_scaling=10.0, prediction_type="epsilon")
    pipe = LatentConsistencyModelPipeline(
        unet=unet, vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2), tokenizer=tiny_tokenizer(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, folder)


def tiny_sdxl(folder: str | Path | None = None, seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline``: text encoders of width 32 + 32 = cross_attention_dim 64,
    pooled projection 32, time ids embedded with 8 channels each (6 * 8 + 32 = 80 added-embedding inputs)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = tiny_unet(seed, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=80, transformer_layers_per_block=(1, 1))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2),
        text_encoder_2=tiny_text_encoder(seed + 3, with_projection=True), tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(), scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    return _save(pipe, folder)


def tiny_lora_file(unet, path: str | Path, rank: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    """Save a random LoRA (B != 0, so it changes the output) for ``unet`` in diffusers' format.

    ``unet`` is left untouched: the adapter is added to a deep copy.
    """
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    path = Path(path)
    StableDiffusionPipeline.save_lora_weights(str(path.parent), unet_lora_layers=get_peft_model_state_dict(model),
                                              weight_name=path.name, safe_serialization=True)
    return path


def torchrun_lcmkit(args: list[str], port: int, timeout: float = 240):
    """``torchrun --nproc_per_node 2 -m lcmkit.cli ARGS`` (one thread per process, offline) on master port
    ``port``; the finished ``subprocess.CompletedProcess`` (text output captured)."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), "-m", "lcmkit.cli", *args]
    return subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=timeout)



def tiny_flow_vae(scaling_factor: float, shift_factor: float):
    """The 16-channel VAE of the tiny SD3 and FLUX pipelines (VAE factor 8), with the family's scaling and shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=2, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    ).eval()

def tiny_sd3(folder: str | Path | None = None, seed: int = 0, scheduler=None):
    """A tiny ``StableDiffusion3Pipeline`` without T5 (``text_encoder_3=None``, as SD3 may run): an
    ``SD3Transformer2DModel`` with SD3's 16 latent channels and patch size 2 (two joint blocks), two tiny CLIP
    encoders with projection (pooled 32 + 32), a 16-channel VAE with SD3's scaling and shift factors, and a
    ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3 unless ``scheduler`` is given."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = tiny_flow_vae(1.5305, 0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_text_encoder(seed + 2, with_projection=True), tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_text_encoder(seed + 3, with_projection=True), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    return _save(pipe, folder)


#: FLUX.1's scheduler config (``black-forest-labs/FLUX.1-dev``): shift by image sequence length, μ from 0.5 at 256
#: tokens to 1.15 at 4096
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over single printable ASCII characters, with and without the word-start marker
    "▁" (ids: <pad> 0, </s> 1, <unk> 2), built here instead of downloaded."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        vocab += [(ch, -3.0), ("\u2581" + ch, -2.5)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_t5_encoder(seed: int = 0, vocab_size: int = 192, d_model: int = 32):
    """A 2-layer ``T5EncoderModel`` (width 32) whose token ids match :func:`tiny_t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_flux(folder: str | Path | None = None, seed: int = 0, guidance_embeds: bool = True, scheduler=None):
    """A tiny ``FluxPipeline``: a ``FluxTransformer2DModel`` with FLUX's packed input (16 latent channels × 2×2
    patches = 64, patch_size 1), one double-stream and one single-stream block of 2 heads × 16 (RoPE axes 4 + 6 +
    6), ``guidance_embeds`` as FLUX.1-dev (True) or schnell (False); a tiny CLIP text encoder (its pooled output,
    32) and T5 encoder (its tokens, 32); a 16-channel VAE with FLUX.1's scaling and shift factors (scale factor 8:
    a 64 px image is an 8×8 latent, 4×4 = 16 tokens); a ``FlowMatchEulerDiscreteScheduler`` with FLUX's dynamic
    shift unless ``scheduler`` is given."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(seed + 1)
    vae = tiny_flow_vae(0.3611, 0.1159)
    t5_tokenizer = tiny_t5_tokenizer()
    pipe = FluxPipeline(
        transformer=transformer, vae=vae, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        text_encoder=tiny_text_encoder(seed + 2), tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed + 3, vocab_size=len(t5_tokenizer)), tokenizer_2=t5_tokenizer,
    )
    return _save(pipe, folder)
