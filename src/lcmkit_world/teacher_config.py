"""The world teacher's configs (sizes of its components, the training recipe), importable without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lcmkit.errors import LcmkitError


@dataclass
class VaeConfig:
    """``AutoencoderKL`` size. Three blocks = two downsamplings: 32x32 pixels -> 8x8 latents."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16


@dataclass
class TextConfig:
    """``CLIPTextModel`` size. ``max_length`` covers the longest caption (12 words) plus BOS/EOS."""

    # typed settings, one per line: the component configs are alike in shape, not logic to share
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 16


@dataclass
class UNetConfig:
    """``UNet2DConditionModel`` size: one level per width (8x8, 4x4, 2x2, ...; the last does not downsample).

    The first ``attention_levels`` levels (and the mid block) have self- and cross-attention; deeper ones are
    plain ResNet blocks.
    """

    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 32
    attention_levels: int = 2


@dataclass
class TrainConfig:
    """Everything ``train_teacher`` needs; written into every checkpoint and into ``config.json``."""

    out: str = "runs/world-teacher"
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    num_images: int = 40_000  # filled images rendered once; the UNet trains on their cached latents
    outlined_images: int = 20_000  # extra outlined images in the VAE's training set (for style fine-tunes)
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_edge_weight: float = 0.1
    unet_steps: int = 9000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 300
    min_lr_ratio: float = 0.1  # cosine decays the learning rate to lr * min_lr_ratio
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0  # 0 disables min-SNR weighting
    caption_dropout: float = 0.1
    # probability that a training caption is an open caption (each of size/colour/position/background named with
    # probability 1/2) instead of the exact one: the teacher learns prompts that leave the image uncertain
    open_captions: float = 0.0
    # a teacher pipeline folder to start from: its VAE, tokenizer, text encoder and UNet are loaded and only the
    # UNet phase runs (the VAE and decoder phases are skipped; the folder's scaling_factor is kept)
    init_from: str | None = None
    vae_decoder_steps: int = 1500  # decoder-only polish on the frozen encoder's latents, after caching them
    checkpoint_every: int = 250
    seed: int = 0
    threads: int = 2
    # bfloat16 autocast, weights stay float32: ~1.4x faster for the VAE's 32x32 convolutions on AVX512-BF16
    # CPUs; slower than float32 for the UNet's 8x8 feature maps, so off there by default.
    vae_bf16: bool = True
    unet_bf16: bool = False

    def __post_init__(self):
        for name, cls in (("vae", VaeConfig), ("text", TextConfig), ("unet", UNetConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):  # loaded from JSON
                setattr(self, name, cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}))
        if len(self.vae.block_out_channels) != 3:
            raise LcmkitError("vae.block_out_channels needs 3 entries (two downsamplings: 32x32 -> 8x8)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise LcmkitError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.open_captions <= 1.0:
            raise LcmkitError(f"open_captions must be in [0, 1], got {self.open_captions}")
        if self.init_from is not None and not (Path(self.init_from) / "model_index.json").is_file():
            raise LcmkitError(f"--init-from {self.init_from}: not a pipeline folder (no model_index.json)")
        for name in ("vae_steps", "vae_decoder_steps", "unet_steps", "outlined_images"):
            if getattr(self, name) < 0:
                raise LcmkitError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("batch_size", "vae_batch_size", "num_images", "checkpoint_every", "threads"):
            if getattr(self, name) <= 0:
                raise LcmkitError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TransformerConfig:
    """``SD3Transformer2DModel`` size: ``num_layers`` joint (MMDiT) blocks of width ``num_heads * head_dim`` over
    8x8 latents cut into ``patch_size``² patches (2, as SD3: 16 image tokens)."""

    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    qk_norm: str | None = "rms_norm"


@dataclass
class FlowTrainConfig(TrainConfig):
    """The flow-matching world teacher: an SD3-style pipeline (``SD3Transformer2DModel``, two CLIP text encoders
    with projection, no T5) trained on the latents of an existing world teacher's VAE (``init_from``), whose VAE
    and tokenizer it keeps. ``unet_steps`` counts the transformer phase's steps; ``text`` sizes each CLIP encoder.
    Timesteps σ = sigmoid(u), u ~ N(``logit_mean``, ``logit_std``²) (SD3's logit-normal sampling); ``shift`` goes
    into the saved ``FlowMatchEulerDiscreteScheduler``."""

    out: str = "runs/flow-teacher"
    text: TextConfig = field(default_factory=lambda: TextConfig(num_layers=3))
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    init_from: str | None = None
    outlined_images: int = 0
    vae_steps: int = 0
    vae_decoder_steps: int = 0
    unet_steps: int = 6000
    lr: float = 5e-4
    warmup_steps: int = 300
    open_captions: float = 0.75
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    t5_tokens: int = 256  # the zero tokens StableDiffusion3Pipeline adds without T5 (its max_sequence_length)
    threads: int = 1

    def __post_init__(self):
        if isinstance(self.transformer, dict):
            self.transformer = TransformerConfig(**self.transformer)
        if self.init_from is None:
            from lcmkit_world.world import shipped_teacher

            self.init_from = str(shipped_teacher("open"))
        super().__post_init__()
        t = self.transformer
        if t.num_layers < 1 or t.num_heads < 1 or t.head_dim < 1 or t.patch_size not in (1, 2, 4):
            raise LcmkitError(f"transformer: layers, heads and head width must be positive and the patch size 1, 2 or "
                              f"4 (the world's latents are 8x8), got {t}")
        if self.logit_std <= 0 or self.shift <= 0:
            raise LcmkitError(f"logit_std and shift must be positive, got {self.logit_std} and {self.shift}")
