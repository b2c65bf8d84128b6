"""Train the shapes world's teacher: a tiny Stable Diffusion made of real diffusers/transformers classes.

The teacher is the same four components as Stable Diffusion 1.x, only small, so every code path that serves
real SD (loading, CFG, schedulers, distillation) also serves the built-in world:

- ``AutoencoderKL``: 32x32x3 pixels <-> 8x8x4 latents (two downsamplings, x4). ``scaling_factor`` is set from
  the data: 1 / std of the cached latents, so scaled latents have unit variance as in SD.
- ``CLIPTextModel`` with a word-level tokenizer saved as a standard fast tokenizer (``tokenizer.json``). Prompts
  are wrapped in ``<|startoftext|> ... <|endoftext|>`` and padded to ``model_max_length`` like SD; "" works.
- ``UNet2DConditionModel`` with cross-attention at the 8x8 and 4x4 resolutions.
- DDPM ``scaled_linear`` schedule (beta 0.00085 -> 0.012, T = 1000), epsilon prediction.

Training runs in three phases, all resumable from atomic checkpoints:

1. the VAE alone (MSE + a tiny KL + an edge term), on filled *and* outlined images so that later style
   fine-tunes can reuse it;
2. the decoder alone on the frozen encoder's posterior means (the latents the UNet learns stay valid);
3. the UNet and the text encoder jointly on cached latents (each image encoded once with the posterior mean),
   with caption dropout (-> "") for classifier-free guidance, min-SNR-gamma loss weighting, warm-up + cosine
   learning rate, and an EMA of both networks; the EMA weights are what gets saved.

The result is a standard ``StableDiffusionPipeline`` folder (safetensors, no safety checker).
Conventions: images are float tensors in [-1, 1], shape (B, 3, 32, 32); latents (B, 4, 8, 8), already multiplied
by ``scaling_factor`` wherever they meet the UNet.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lcmkit.atomic import atomic_write, write_json
from lcmkit.errors import LcmkitError
from lcmkit.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_dirs,
    damaged,
    load_checkpoint,
    save_checkpoint,
)
from lcmkit.train.folder import acquire_lock, check_output_path
from lcmkit.train.optim import ema_update_, lr_factor
from lcmkit_world import world
from lcmkit_world.teacher_config import TextConfig, TrainConfig, UNetConfig, VaeConfig  # noqa: F401
from lcmkit_world.teacher_model import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    count_parameters,
    load_kept_parts,
    save_pipeline,
)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> float (B, 3, 32, 32) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_cached(cache_dir: Path, n: int, seed: int, style: str) -> tuple[np.ndarray, np.ndarray]:
    """``world.sample(n, seed, style)`` as (images uint8, spec index into ``world.all_specs()``), cached as .npz."""
    path = cache_dir / f"world-{style}-seed{seed}-n{n}.npz"
    if path.exists():
        data = np.load(path)
        return data["images"], data["spec_index"]
    images, specs = world.sample(n, seed=seed, style=style)
    order = {world.caption(s): i for i, s in enumerate(world.all_specs())}
    spec_index = np.array([order[world.caption(s)] for s in specs], dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, images=images, spec_index=spec_index))
    return images, spec_index


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (B, model_max_length) int64 ids, padded exactly as ``StableDiffusionPipeline`` pads them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------
def edge_l1(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: penalises blurred edges that MSE forgives."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(x_hat) - dx(x)).abs().mean() + (dy(x_hat) - dy(x)).abs().mean()


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float, edge_weight: float):
    """Reconstruction loss of a sampled latent: MSE + ``edge_weight`` * edge L1 + ``kl_weight`` * KL per element.

    Returns ``(loss, terms)`` with ``terms`` the unweighted parts as floats.
    """
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample(generator=generator)).sample
    mse = F.mse_loss(x_hat, x)
    edge = edge_l1(x_hat, x)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    loss = mse + edge_weight * edge + kl_weight * kl
    return loss, {"mse": mse.item(), "edge": edge.item(), "kl": kl.item()}


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for epsilon prediction (Hang et al. 2023): min(SNR_t, gamma) / SNR_t."""
    snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr if gamma > 0 else torch.ones_like(snr)


def diffusion_loss(unet, text_encoder, z0: torch.Tensor, input_ids: torch.Tensor, alphas_cumprod: torch.Tensor,
                   generator: torch.Generator, min_snr_gamma: float) -> torch.Tensor:
    """Epsilon-prediction loss at uniform t: z_t = alpha_t z0 + sigma_t eps, || eps_hat(z_t, t, c) - eps ||^2.

    ``z0`` are scaled latents (B, 4, 8, 8); ``input_ids`` (B, L) already carry the caption dropout.
    """
    b = z0.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (b,), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    a = alphas_cumprod[t].sqrt().view(b, 1, 1, 1)
    s = (1.0 - alphas_cumprod[t]).sqrt().view(b, 1, 1, 1)
    z_t = a * z0 + s * eps
    context = text_encoder(input_ids)[0]  # (B, L, D) last hidden state, as SD uses it
    eps_hat = unet(z_t, t, encoder_hidden_states=context).sample
    per_sample = (eps_hat - eps).pow(2).mean(dim=(1, 2, 3))
    return (min_snr_weight(alphas_cumprod, t, min_snr_gamma) * per_sample).mean()


# --------------------------------------------------------------------------------------------------------------
# EMA and checkpoints
# --------------------------------------------------------------------------------------------------------------
class Ema:
    """Exponential moving average of a module's floating-point state (lcmkit's EMA update, with warm-up:
    μ_n = min(μ, (1 + n) / (10 + n)))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        current = module.state_dict()
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages do not keep the random init
        ema_update_(self.shadow.values(), [current[k].detach() for k in self.shadow], decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow, strict=False)


# --------------------------------------------------------------------------------------------------------------
# Saving the pipeline and plotting
# --------------------------------------------------------------------------------------------------------------
def plot_losses(curves: dict[str, list[float]], path: Path, step_every: int = 1) -> None:
    """One panel per curve (raw and a running mean), log-scale y; written with the Agg backend. Value i of a curve
    is at step ``i * step_every``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        v = np.asarray(values)
        k = max(1, len(v) // 50)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(v)) * step_every, v, alpha=0.3, lw=0.5)
        ax.plot(np.arange(k - 1, len(v)) * step_every, smooth, lw=1.5)
        ax.set_yscale("log")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Components:
    """The teacher's networks and their EMAs (the EMAs are what gets saved)."""

    tokenizer: object
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    ema_text_encoder: Ema
    ema_unet: Ema

    @classmethod
    def build(cls, cfg: TrainConfig) -> "Components":
        if cfg.init_from is not None:
            return cls.load(cfg)
        tokenizer = build_tokenizer(cfg.text.max_length)
        vae = build_vae(cfg.vae)
        text_encoder = build_text_encoder(cfg.text, tokenizer)
        unet = build_unet(cfg.unet, cfg.vae.latent_channels, cfg.text.hidden_size)
        return cls(tokenizer, vae, text_encoder, unet, Ema(text_encoder, cfg.ema_decay), Ema(unet, cfg.ema_decay))

    @classmethod
    def load(cls, cfg: TrainConfig) -> "Components":
        """The networks of the pipeline folder ``cfg.init_from`` (float32), EMAs starting from its weights."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        root = Path(cfg.init_from)
        tokenizer, vae = load_kept_parts(root)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=torch.float32,
                                                     use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32, use_safetensors=True)
        return cls(tokenizer, vae, text_encoder, unet, Ema(text_encoder, cfg.ema_decay), Ema(unet, cfg.ema_decay))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the denoiser phase trains: the UNet and the text encoder."""
        return [*self.unet.parameters(), *self.text_encoder.parameters()]

    def parameter_counts(self) -> dict[str, int]:
        return {"vae": count_parameters(self.vae), "text_encoder": count_parameters(self.text_encoder),
                "unet": count_parameters(self.unet)}

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "vae": self.vae.state_dict(), "text_encoder": self.text_encoder.state_dict(),
            "unet": self.unet.state_dict(), "ema_text_encoder": self.ema_text_encoder.shadow,
            "ema_unet": self.ema_unet.shadow,
        }

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        self.vae.load_state_dict(weights["vae"])
        self.text_encoder.load_state_dict(weights["text_encoder"])
        self.unet.load_state_dict(weights["unet"])
        self.ema_text_encoder.shadow = weights["ema_text_encoder"]
        self.ema_unet.shadow = weights["ema_unet"]

    def ema_copies(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Fresh text encoder and UNet holding the EMA weights (the training copies stay untouched)."""
        import copy

        text_encoder, unet = copy.deepcopy(self.text_encoder), copy.deepcopy(self.unet)
        self.ema_text_encoder.copy_to(text_encoder)
        self.ema_unet.copy_to(unet)
        return text_encoder.eval(), unet.eval()


@dataclass
class RunState:
    """Resumable progress: phase ("vae", "decoder", "unet", "done"), step within it, losses, seconds spent per phase."""

    phase: str = "vae"
    step: int = 0
    losses: dict = field(default_factory=lambda: {"vae": [], "decoder": [], "unet": []})
    seconds: dict = field(default_factory=lambda: {"render": 0.0, "vae": 0.0, "latents": 0.0, "decoder": 0.0,
                                                   "unet": 0.0})
    scaling_factor: float = 1.0


class Trainer:
    """The recipe. ``run()`` renders the data, trains the VAE, caches latents, optionally polishes the decoder,
    trains the UNet and text encoder, and saves the pipeline. Every ``checkpoint_every`` steps (and at the end of
    each phase) it checkpoints; ``resume=True`` picks up from the latest checkpoint at the same step, with the same
    optimizer, EMA and random-generator state, so a resumed run reproduces the losses of an uninterrupted one.
    Sets torch's intra-op thread count to ``cfg.threads`` (process-wide). ``components`` builds the networks; a
    subclass with other networks overrides it with ``train_unet`` and ``save``."""

    components = Components

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print):
        self.cfg, self.progress, self.log = cfg, progress, log
        self.out = Path(cfg.out)
        self.cache = self.out / "cache"
        if (self.out / CHECKPOINT_DIR / "latest.json").exists():
            raise LcmkitError(f"{self.out} holds a teacher run in the checkpoint format of lcmkit 0.1 (latest.json), "
                              "which this version does not resume; choose another --out")
        if checkpoint_dirs(self.out) and not resume:
            raise LcmkitError(f"{self.out} already holds a training run; pass --resume to continue it "
                              "or choose another --out")
        _check_cache_inside(self.out, self.cache)
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # initial weights
        self.parts = self.components.build(cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.state = RunState()
        self.vae_opt = torch.optim.AdamW(self.parts.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(self.parts.trainable_parameters(), lr=cfg.lr,
                                          weight_decay=cfg.weight_decay)
        self.alphas_cumprod = build_scheduler("ddpm").alphas_cumprod.float()
        self.parts.vae.to(memory_format=torch.channels_last)
        self._resumed: dict = {}
        if resume:
            self._resume()

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        found = checkpoint_dirs(self.out)
        if not found:
            self.log(f"no checkpoint under {self.out / CHECKPOINT_DIR}; starting from scratch")
            return
        weights, state = load_checkpoint(found[-1])
        try:
            self.parts.load_weights(weights)
            self.vae_opt.load_state_dict(state["vae_opt"])
            self.unet_opt.load_state_dict(state["unet_opt"])
            self.generator.set_state(state["generator"])
            self.state = RunState(**state["run"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise damaged(found[-1], f"it does not load into this teacher: {type(e).__name__}: {e}") from e
        self._resumed = state
        self.log(f"resumed {found[-1]} (phase {self.state.phase}, step {self.state.step})")

    def checkpoint(self) -> None:
        state = {
            "vae_opt": self.vae_opt.state_dict(), "unet_opt": self.unet_opt.state_dict(),
            "generator": self.generator.get_state(), "run": asdict(self.state), "config": self.cfg.to_dict(),
        }
        if hasattr(self, "decoder_opt"):
            state["decoder_opt"] = self.decoder_opt.state_dict()
        # numbered by the steps done over all phases, so the newest checkpoint is always the highest number
        done = sum(len(v) for v in self.state.losses.values())
        save_checkpoint(self.out, done, self.parts.weights(), state, keep=1)

    # -- data -------------------------------------------------------------------------------------------------
    def render(self) -> None:
        start = time.time()
        self.images, self.spec_index = render_cached(self.cache, self.cfg.num_images, self.cfg.seed, "filled")
        if self.cfg.outlined_images:
            outlined, _ = render_cached(self.cache, self.cfg.outlined_images, self.cfg.seed + 1, "outlined")
            self.vae_images = np.concatenate([self.images, outlined])
        else:
            self.vae_images = self.images
        self.state.seconds["render"] += time.time() - start

    def _batch(self, n_items: int, batch_size: int) -> torch.Tensor:
        return torch.randint(0, n_items, (batch_size,), generator=self.generator)

    # -- phase 1: VAE -----------------------------------------------------------------------------------------
    def train_vae(self) -> None:
        cfg, vae = self.cfg, self.parts.vae
        vae.train()
        for step in self._steps("vae", cfg.vae_steps):
            for group in self.vae_opt.param_groups:
                group["lr"] = cfg.vae_lr * lr_factor(step, min(200, cfg.warmup_steps), cfg.vae_steps, "cosine", 0.05)
            x = images_to_tensor(self.vae_images[self._batch(len(self.vae_images), cfg.vae_batch_size).numpy()])
            with self._autocast(cfg.vae_bf16):
                loss, terms = vae_loss(vae, x.contiguous(memory_format=torch.channels_last), self.generator,
                                       cfg.vae_kl_weight, cfg.vae_edge_weight)
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            self.vae_opt.step()
            self._record("vae", terms["mse"])
        vae.eval()

    def train_decoder(self) -> None:
        """Polish the decoder on the frozen encoder's posterior means: the latents the UNet learns stay valid."""
        cfg, vae = self.cfg, self.parts.vae
        opt = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        if "decoder_opt" in self._resumed:
            opt.load_state_dict(self._resumed["decoder_opt"])
        self.decoder_opt = opt
        vae.decoder.train()
        for step in self._steps("decoder", cfg.vae_decoder_steps):
            for group in opt.param_groups:
                group["lr"] = 0.5 * cfg.vae_lr * lr_factor(step, 100, cfg.vae_decoder_steps, "cosine", 0.05)
            x = images_to_tensor(self.vae_images[self._batch(len(self.vae_images), cfg.vae_batch_size).numpy()])
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean
            with self._autocast(cfg.vae_bf16):
                x_hat = vae.decode(z).sample
                mse = F.mse_loss(x_hat.float(), x)
                loss = mse + cfg.vae_edge_weight * edge_l1(x_hat.float(), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
            opt.step()
            self._record("decoder", mse.item())
        vae.eval()

    @staticmethod
    def _autocast(enabled: bool):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    # -- latents ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self) -> None:
        """Encode every filled image once (posterior mean); set ``scaling_factor`` = 1 / std of the latents."""
        path = self.cache / "latents.pt"
        if path.exists():
            self.latents = torch.load(path, weights_only=True)
        else:
            start = time.time()
            self.parts.vae.eval()
            chunks = [self.parts.vae.encode(images_to_tensor(self.images[i:i + 1000])).latent_dist.mean
                      for i in range(0, len(self.images), 1000)]
            self.latents = torch.cat(chunks)
            atomic_write(path, lambda tmp: torch.save(self.latents, tmp))
            self.state.seconds["latents"] += time.time() - start
        if self.cfg.init_from is not None:  # the latents the loaded UNet was trained on: keep its scale
            self.state.scaling_factor = float(self.parts.vae.config.scaling_factor)
        else:
            self.state.scaling_factor = float(1.0 / self.latents.std())
        self.parts.vae.register_to_config(scaling_factor=self.state.scaling_factor)
        # every open caption of every spec: row spec * 16 + subset; subset 15 names all five (the exact caption)
        self.subsets = world.named_subsets()
        self.input_ids = tokenize(self.parts.tokenizer, [world.caption(spec, named) for spec in world.all_specs()
                                                         for named in self.subsets])  # (540 * 16, L)
        self.empty_ids = tokenize(self.parts.tokenizer, [""])  # (1, L)

    # -- phase 2: UNet + text encoder -------------------------------------------------------------------------
    def train_unet(self) -> None:
        cfg, parts = self.cfg, self.parts
        parts.unet.train()
        parts.text_encoder.train()
        params = [*parts.unet.parameters(), *parts.text_encoder.parameters()]
        for step in self._steps("unet", cfg.unet_steps):
            for group in self.unet_opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.unet_steps, "cosine", cfg.min_lr_ratio)
            idx = self._batch(len(self.latents), cfg.batch_size)
            z0 = self.latents[idx] * self.state.scaling_factor
            ids = self.caption_ids(idx)
            with self._autocast(cfg.unet_bf16):
                loss = diffusion_loss(parts.unet, parts.text_encoder, z0, ids, self.alphas_cumprod, self.generator,
                                      cfg.min_snr_gamma)
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.unet_opt.step()
            parts.ema_unet.update(parts.unet, step)
            parts.ema_text_encoder.update(parts.text_encoder, step)
            self._record("unet", loss.item())

    def caption_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids of the training captions of images ``idx``: the exact caption, or with probability
        ``open_captions`` a random open one; then "" with probability ``caption_dropout`` (for CFG)."""
        cfg = self.cfg
        subset = torch.full((len(idx),), len(self.subsets) - 1)
        if cfg.open_captions > 0:
            is_open = torch.rand(len(idx), generator=self.generator) < cfg.open_captions
            subset = torch.where(is_open, torch.randint(0, len(self.subsets), (len(idx),),
                                                        generator=self.generator), subset)
        ids = self.input_ids[torch.from_numpy(self.spec_index)[idx] * len(self.subsets) + subset]
        drop = torch.rand(len(idx), generator=self.generator) < cfg.caption_dropout
        return torch.where(drop[:, None], self.empty_ids, ids)  # "" for classifier-free guidance

    # -- shared loop machinery --------------------------------------------------------------------------------
    def _steps(self, phase: str, total: int):
        """Yield the remaining step numbers of ``phase`` with a progress bar; checkpoint periodically."""
        from tqdm import tqdm

        start_step = self.state.step if self.state.phase == phase else 0
        self.state.phase, self.state.step = phase, start_step
        bar = tqdm(total=total, initial=start_step, desc=phase, disable=not self.progress, mininterval=5,
                   dynamic_ncols=True)
        self._bar, tick = bar, time.time()
        for step in range(start_step, total):
            yield step
            now = time.time()
            self.state.seconds[phase] += now - tick
            tick = now
            self.state.step = step + 1
            bar.update(1)
            if self.state.step % self.cfg.checkpoint_every == 0 or self.state.step == total:
                self.checkpoint()
                self.on_checkpoint(phase)
                tick = time.time()
        bar.close()

    def _record(self, phase: str, loss: float, **postfix) -> None:
        self.state.losses[phase].append(loss)
        if self.state.step % 20 == 0:
            recent = self.state.losses[phase][-20:]
            self._bar.set_postfix(loss=f"{sum(recent) / len(recent):.4g}", refresh=False)

    def on_checkpoint(self, phase: str) -> None:
        """After each checkpoint: refresh the loss plot; in the UNet phase also save the EMA pipeline."""
        plot_losses(self.state.losses, self.out / "loss.png")
        if phase == "unet":
            self.save(self.out / "pipeline")

    def save(self, folder: Path) -> None:
        text_encoder, unet = self.parts.ema_copies()
        save_pipeline(folder, self.parts.vae, text_encoder, self.parts.tokenizer, unet)

    def write_summary(self) -> dict:
        parts = self.parts
        summary = {
            "config": self.cfg.to_dict(),
            "parameters": parts.parameter_counts(),
            "scaling_factor": self.state.scaling_factor,
            "seconds": self.state.seconds,
            "final_loss": {k: float(np.mean(v[-100:])) for k, v in self.state.losses.items() if v},
        }
        write_json(self.out / "training.json", summary, indent=2)
        return summary

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", self.cfg.to_dict(), indent=2)
        self.render()
        if self.cfg.init_from is not None and self.state.phase in ("vae", "decoder"):
            self.state.phase, self.state.step = "unet", 0  # the loaded VAE is kept as it is
        if self.state.phase == "vae":
            self.train_vae()
        self.encode_latents()
        if self.state.phase in ("vae", "decoder"):
            self.train_decoder()
        if self.state.phase in ("vae", "decoder", "unet"):
            self.train_unet()
        self.state.phase = "done"
        self.save(self.out / "pipeline")
        plot_losses(self.state.losses, self.out / "loss.png")
        self.write_summary()
        return self.out / "pipeline"


def _check_cache_inside(out: Path, cache: Path) -> None:
    """A resumed run reads its caches (rendered images, latents): never through a link leading out of ``out``."""
    root = out.resolve()
    for p in [cache, *(sorted(cache.iterdir()) if cache.is_dir() else [])]:
        if os.path.lexists(p) and not p.resolve().is_relative_to(root):
            raise LcmkitError(f"{p} links to {p.resolve()}, outside the run folder {out}; lcmkit follows no link out "
                              "of a run folder: remove the link")


def train_teacher(cfg: TrainConfig, resume: bool = False, progress: bool = True, trainer: type = Trainer,
                  command: str = "lcmkit world train-teacher") -> Path:
    """Train (or resume) the world teacher under ``cfg.out`` with ``trainer``; returns the saved pipeline folder. The
    folder is locked for the run (:func:`lcmkit.train.folder.acquire_lock`): a second run into it is refused at
    once."""
    out = check_output_path(cfg.out, "output folder")
    if out.exists() and not out.is_dir():
        raise LcmkitError(f"output {out} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out, command)
    try:
        return trainer(cfg, resume=resume, progress=progress).run()
    finally:
        lock.release()
