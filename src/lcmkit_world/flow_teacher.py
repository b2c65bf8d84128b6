"""Train the shapes world's flow-matching teacher: a tiny Stable Diffusion 3 made of real diffusers classes.

The pipeline is an ordinary ``StableDiffusion3Pipeline`` folder: an ``SD3Transformer2DModel`` (joint text-image
attention, AdaLN timestep + pooled-text conditioning), two ``CLIPTextModelWithProjection`` encoders sharing the
world's word-level tokenizer, no T5 (``text_encoder_3=None``: the pipeline fills its ``max_sequence_length`` tokens with zeros, which training
collapses into one token of that multiplicity, :mod:`lcmkit.flow_attention`), the VAE of
an existing world teacher (``init_from``, kept frozen, with ``shift_factor = 0``), and a
``FlowMatchEulerDiscreteScheduler``.

Rectified-flow training (docs/flow-matching.md): for scaled latents z0 and noise ε, σ = sigmoid(u) with
u ~ N(m, s²) (SD3's logit-normal timestep density), x_σ = (1 − σ)·z0 + σ·ε, and the transformer, called with
timestep σ·1000, regresses the velocity v = ε − z0 under plain MSE. Captions are exact or open and dropped to ""
for classifier-free guidance exactly as for the UNet teacher (:meth:`lcmkit_world.teacher.Trainer.caption_ids`);
the loop, checkpoints, resume and EMA are that trainer's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lcmkit.atomic import atomic_folder
from lcmkit.flow_attention import collapsed_attention
from lcmkit.train.optim import lr_factor
from lcmkit_world.teacher import Ema, Trainer, train_teacher
from lcmkit_world.teacher_config import FlowTrainConfig, TextConfig, TransformerConfig
from lcmkit_world.teacher_model import build_text_encoder, count_parameters, load_kept_parts


def build_transformer(cfg: TransformerConfig, latent_channels: int, latent_size: int, text_width: int):
    """``SD3Transformer2DModel`` for ``latent_size``² latents; context width = the two CLIP widths side by side
    (``joint_attention_dim``, as SD3 pads CLIP embeddings to it), pooled width likewise."""
    from diffusers import SD3Transformer2DModel

    inner = cfg.num_heads * cfg.head_dim
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=cfg.patch_size, in_channels=latent_channels,
        out_channels=latent_channels, num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads, joint_attention_dim=2 * text_width, caption_projection_dim=inner,
        pooled_projection_dim=2 * text_width, pos_embed_max_size=latent_size // cfg.patch_size,
        qk_norm=cfg.qk_norm,
    )


def sd3_text_embeddings(text_encoders, input_ids: torch.Tensor, joint_dim: int,
                        t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(context, multiplicity, pooled)`` of ``StableDiffusion3Pipeline.encode_prompt`` without T5, from token ids
    shared by both CLIP encoders, with the absent-T5 tail collapsed (:mod:`lcmkit.flow_attention`): the context is
    each encoder's penultimate hidden state, side by side and zero-padded to ``joint_dim``, then one all-zero token
    standing for the pipeline's ``t5_tokens`` (its ``max_sequence_length``); pooled = the two projected pooled
    embeddings side by side. Differentiable (the training path)."""
    hidden, pooled = [], []
    for encoder in text_encoders:
        out = encoder(input_ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    context = torch.cat([clip, clip.new_zeros(clip.shape[0], 1, joint_dim)], dim=1)
    multiplicity = torch.ones(context.shape[1])
    multiplicity[-1] = t5_tokens
    return context, multiplicity, torch.cat(pooled, dim=-1)


def flow_matching_loss(transformer, text_encoders, z0: torch.Tensor, input_ids: torch.Tensor,
                       generator: torch.Generator, logit_mean: float, logit_std: float,
                       t5_tokens: int) -> torch.Tensor:
    """Rectified-flow loss: σ = sigmoid(m + s·n), n ~ N(0, 1); x_σ = (1 − σ) z0 + σ ε; ‖v̂(x_σ, 1000σ, c) − (ε − z0)‖²."""
    b = z0.shape[0]
    sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(b, generator=generator))
    eps = torch.randn(z0.shape, generator=generator)
    s = sigma.view(b, 1, 1, 1)
    x_sigma = (1.0 - s) * z0 + s * eps
    context, multiplicity, pooled = sd3_text_embeddings(text_encoders, input_ids,
                                                        transformer.config.joint_attention_dim, t5_tokens)
    with collapsed_attention(transformer):
        v_hat = transformer(hidden_states=x_sigma, timestep=sigma * 1000.0, encoder_hidden_states=context,
                            pooled_projections=pooled, joint_attention_kwargs={"context_multiplicity": multiplicity},
                            return_dict=False)[0]
    return F.mse_loss(v_hat, eps - z0)


@dataclass
class FlowComponents:
    """The flow teacher's networks: the kept VAE and tokenizer, two CLIP encoders, the transformer, their EMAs."""

    tokenizer: object
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    transformer: torch.nn.Module
    ema: dict[str, Ema]

    TRAINED = ("text_encoder", "text_encoder_2", "transformer")

    @classmethod
    def build(cls, cfg: FlowTrainConfig) -> "FlowComponents":
        tokenizer, vae = load_kept_parts(Path(cfg.init_from))
        vae.register_to_config(shift_factor=0.0)  # SD3's decode reads it: latents / scaling_factor + shift_factor
        text_encoder = build_text_encoder(cfg.text, tokenizer, with_projection=True)
        text_encoder_2 = build_text_encoder(cfg.text, tokenizer, with_projection=True)
        latent_size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
        transformer = build_transformer(cfg.transformer, vae.config.latent_channels, latent_size, cfg.text.hidden_size)
        parts = dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, transformer=transformer)
        return cls(tokenizer, vae, **parts, ema={k: Ema(m, cfg.ema_decay) for k, m in parts.items()})

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in self.TRAINED for p in getattr(self, name).parameters()]

    def parameter_counts(self) -> dict[str, int]:
        return {name: count_parameters(getattr(self, name)) for name in ("vae", *self.TRAINED)}

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {name: getattr(self, name).state_dict() for name in ("vae", *self.TRAINED)}
        out.update({f"ema_{name}": ema.shadow for name, ema in self.ema.items()})
        return out

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        for name in ("vae", *self.TRAINED):
            getattr(self, name).load_state_dict(weights[name])
        for name, ema in self.ema.items():
            ema.shadow = weights[f"ema_{name}"]

    def ema_copies(self) -> dict[str, torch.nn.Module]:
        """Fresh copies of the trained networks holding the EMA weights (the training copies stay untouched)."""
        out = {}
        for name, ema in self.ema.items():
            module = copy.deepcopy(getattr(self, name))
            ema.copy_to(module)
            out[name] = module.eval()
        return out


def save_flow_pipeline(out_dir: Path, parts: FlowComponents, networks: dict[str, torch.nn.Module],
                       shift: float) -> None:
    """Save a ``StableDiffusion3Pipeline`` folder (safetensors; VAE in float16, as the UNet teacher stores it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=networks["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=copy.deepcopy(parts.vae).to(torch.float16), text_encoder=networks["text_encoder"],
        tokenizer=parts.tokenizer, text_encoder_2=networks["text_encoder_2"], tokenizer_2=parts.tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    atomic_folder(out_dir, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


class FlowTrainer(Trainer):
    """:class:`lcmkit_world.teacher.Trainer` with the flow teacher's networks: the VAE phases are skipped (the VAE
    is ``init_from``'s), the denoiser phase trains the transformer and both text encoders by
    :func:`flow_matching_loss`, and the saved pipeline is a ``StableDiffusion3Pipeline``."""

    components = FlowComponents

    def train_unet(self) -> None:
        cfg, parts = self.cfg, self.parts
        params = parts.trainable_parameters()
        encoders = (parts.text_encoder, parts.text_encoder_2)
        for name in FlowComponents.TRAINED:
            getattr(parts, name).train()
        for step in self._steps("unet", cfg.unet_steps):
            for group in self.unet_opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.unet_steps, "cosine", cfg.min_lr_ratio)
            idx = self._batch(len(self.latents), cfg.batch_size)
            z0 = self.latents[idx] * self.state.scaling_factor
            ids = self.caption_ids(idx)
            with self._autocast(cfg.unet_bf16):
                loss = flow_matching_loss(parts.transformer, encoders, z0, ids, self.generator, cfg.logit_mean,
                                          cfg.logit_std, cfg.t5_tokens)
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.unet_opt.step()
            for name, ema in parts.ema.items():
                ema.update(getattr(parts, name), step)
            self._record("unet", loss.item())

    def save(self, folder: Path) -> None:
        save_flow_pipeline(folder, self.parts, self.parts.ema_copies(), self.cfg.shift)


def train_flow_teacher(cfg: FlowTrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) the flow-matching world teacher under ``cfg.out`` (locked for the run); returns the saved
    pipeline folder."""
    return train_teacher(cfg, resume, progress, trainer=FlowTrainer, command="lcmkit world train-flow-teacher")
