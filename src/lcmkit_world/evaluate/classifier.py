"""The shapes world's attribute classifier: the evaluator behind lcmkit's world metrics.

A small CNN reads a 32x32 RGB image and predicts, with one linear head each, the five caption attributes
(size, colour, shape, position, background) and the style (filled / outlined). Its penultimate layer (the
global-average-pooled feature vector, ``feature_dim`` values) is the embedding that world-FID compares,
the way FID uses Inception's pool3 features.

Conventions
-----------
* Input: float32 ``(N, 3, 32, 32)`` in ``[-1, 1]`` (the same range the diffusion models use). Use
  :func:`as_model_input` to convert uint8 ``(N, 32, 32, 3)`` or float NHWC arrays.
* Label order: ``lcmkit_world.world.ATTRIBUTES`` for the five attributes and ``world.STYLES`` for the style,
  i.e. exactly :meth:`ShapeSpec.labels`.
* GroupNorm, not BatchNorm: a prediction (and a feature vector) depends on its own image only, never on the
  batch it came in, so metrics do not change with the evaluation batch size.
* Two coordinate channels (x and y in [-1, 1], "CoordConv") are appended to the input so that position
  survives global pooling without relying on zero-padding artefacts.
* Augmentation keeps every label valid: Gaussian noise, a slight blur and a tiny per-channel offset. No
  flips or shifts: the world has left/right/top/bottom positions and a triangle points up.

Weights are stored as safetensors plus a ``config.json``; loading never unpickles anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lcmkit.atomic import atomic_write, write_json
from lcmkit.errors import LcmkitError
from lcmkit.train.optim import lr_factor
from lcmkit_world import world

#: Every head the classifier has, in a fixed order, with its class names.
HEADS: dict[str, tuple[str, ...]] = {**world.ATTRIBUTES, "style": world.STYLES}

#: The shipped evaluator (weights committed to the repository).
ASSET_DIR = world.ASSETS / "world-evaluator"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ClassifierConfig:
    """Architecture of :class:`WorldClassifier`; saved as ``config.json`` next to the weights."""

    widths: tuple[int, ...] = (24, 48, 96, 160)
    groups: int = 8
    heads: dict[str, int] = field(default_factory=lambda: {name: len(v) for name, v in HEADS.items()})
    image_size: int = world.IMAGE_SIZE

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


def _conv_block(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    """3x3 conv (no bias: GroupNorm follows) -> GroupNorm -> SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(groups, c_out), nn.SiLU())


def coord_channels(n: int, size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``(n, 2, size, size)``: x (column) and y (row) of each pixel centre, scaled to [-1, 1]."""
    c = (torch.arange(size, dtype=dtype, device=device) + 0.5) / size * 2.0 - 1.0
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x, y]).expand(n, 2, size, size)


class WorldClassifier(nn.Module):
    """32x32 -> stem (32x32) -> 3 x [stride-2 block, block] (16, 8, 4) -> global mean -> heads.

    ``widths = (w0, w1, w2, w3)``: the stem has w0 channels, the three stages w1, w2, w3; the feature
    vector has w3 values.
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        w, g = config.widths, config.groups
        layers = [_conv_block(3 + 2, w[0], 1, g)]
        for c_in, c_out in zip(w[:-1], w[1:]):
            layers += [_conv_block(c_in, c_out, 2, g), _conv_block(c_out, c_out, 1, g)]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, k) for name, k in config.heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, ``(N, feature_dim)``, of images ``(N, 3, 32, 32)`` in [-1, 1]."""
        x = torch.cat([x, coord_channels(x.shape[0], x.shape[-1], x.dtype, x.device)], dim=1)
        return self.body(x).mean(dim=(2, 3))  # global average pool: (N, C, 4, 4) -> (N, C)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head, ``{name: (N, n_classes)}``."""
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}


# --- image conversion --------------------------------------------------------------------------------------
def as_model_input(images) -> torch.Tensor:
    """Convert images to the classifier's input: float32 ``(N, 3, H, W)`` in [-1, 1].

    Accepts uint8 (values 0..255) or float (values in [-1, 1]) numpy arrays or tensors, laid out either
    NHWC ``(N, H, W, 3)`` or NCHW ``(N, 3, H, W)``. uint8 maps as ``x / 127.5 - 1``; floats are clamped.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise LcmkitError(f"expected images of shape (N, H, W, 3) or (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[1] != 3:  # NHWC -> NCHW
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    elif x.is_floating_point():
        x = x.float().clamp(-1.0, 1.0)
    else:
        raise LcmkitError(f"expected uint8 or float images, got {x.dtype}")
    return x.contiguous()


def spec_labels(specs) -> dict[str, torch.Tensor]:
    """``{head: LongTensor (N,)}`` from a list of :class:`world.ShapeSpec` (order of :data:`HEADS`)."""
    labels = [s.labels() for s in specs]
    return {name: torch.tensor([lab[name] for lab in labels], dtype=torch.long) for name in HEADS}


# --- augmentation ------------------------------------------------------------------------------------------
_BLUR_1D = torch.tensor([0.25, 0.5, 0.25])


def augment(x: torch.Tensor, generator: torch.Generator, noise_max: float = 0.15, blur_prob: float = 0.5,
            offset_max: float = 0.04) -> torch.Tensor:
    """Label-preserving augmentation of a batch ``(N, 3, H, W)`` in [-1, 1].

    Per image: with probability ``blur_prob`` a partial [1, 2, 1]/4 blur (mixed in with weight U[0, 1]);
    a per-channel offset U[-offset_max, offset_max]; Gaussian noise with std U[0, noise_max] for half of
    the images. No flips, shifts or crops: those change position or shape labels.
    """
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    k = torch.outer(_BLUR_1D, _BLUR_1D).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    mix = (u(n) < blur_prob).float() * u(n)
    x = x + mix.view(n, 1, 1, 1) * (blurred - x)
    x = x + (u(n, 3) * 2.0 - 1.0).view(n, 3, 1, 1) * offset_max
    std = (u(n) < 0.5).float() * u(n) * noise_max
    x = x + std.view(n, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1.0, 1.0)


# --- training ----------------------------------------------------------------------------------------------
def render_training_set(n: int, seed: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """``n`` real images, half filled (indices 0..n/2-1 of ``seed``) and half outlined (the next indices).

    Returns uint8 ``(n, 32, 32, 3)`` and labels per head.
    """
    n_filled = n // 2
    img_f, spec_f = world.sample(n_filled, seed=seed, style="filled", start=0)
    img_o, spec_o = world.sample(n - n_filled, seed=seed, style="outlined", start=n_filled)
    return np.concatenate([img_f, img_o]), spec_labels(spec_f + spec_o)


def train_classifier(out_dir=ASSET_DIR, steps: int = 2400, batch_size: int = 128, seed: int = 0,
                     n_images: int = 30_000, lr: float = 3e-3, weight_decay: float = 1e-4,
                     eval_images: int = 2000, eval_seed: int = 10_000, progress: bool = True,
                     config: ClassifierConfig | None = None) -> dict:
    """Train the attribute classifier on freshly rendered real images and save it to ``out_dir``.

    Renders ``n_images`` (half filled, half outlined, ``world.sample`` with ``seed``) once into memory,
    then trains with AdamW on the summed cross-entropy of the six heads, label-preserving augmentation
    (:func:`augment`) and a warm-up + cosine learning rate. Finally measures per-head accuracy on
    ``eval_images`` fresh images from ``eval_seed`` (half filled, half outlined), stores it in
    ``config.json``, and returns it. All randomness comes from ``seed`` (no global RNG is touched).
    """
    from tqdm.auto import tqdm

    if eval_seed == seed:
        raise LcmkitError("eval_seed must differ from seed: the accuracy must be measured on unseen images")
    out_dir = Path(out_dir)
    t0 = time.time()
    images, labels = render_training_set(n_images, seed)
    data = torch.from_numpy(images)
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching the caller's RNG
        torch.manual_seed(seed)
        model = WorldClassifier(config)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    model.train()
    bar = tqdm(range(steps), desc="train classifier", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, steps, "cosine")
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        x = augment(as_model_input(data[idx]), gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    accuracy = measure_accuracy(model, eval_images, eval_seed)
    train_info = dict(steps=steps, batch_size=batch_size, seed=seed, n_images=n_images, lr=lr,
                      weight_decay=weight_decay, seconds=round(time.time() - t0, 1),
                      eval=dict(n_images=eval_images, seed=eval_seed, accuracy=accuracy))
    save_classifier(model, out_dir, train_info)
    return accuracy


# --- evaluation, saving, loading ---------------------------------------------------------------------------
@torch.no_grad()
def predict(model: WorldClassifier, images, batch_size: int = 500) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Class predictions ``{head: LongTensor (N,)}`` and float64 features ``(N, feature_dim)``."""
    x = as_model_input(images)
    preds: dict[str, list] = {name: [] for name in model.heads}
    feats = []
    for i in range(0, len(x), batch_size):
        h = model.features(x[i:i + batch_size])
        feats.append(h.double())
        for name, head in model.heads.items():
            preds[name].append(head(h).argmax(dim=1))
    empty = torch.empty(0, dtype=torch.long)
    return ({k: torch.cat(v) if v else empty for k, v in preds.items()},
            torch.cat(feats) if feats else torch.empty(0, model.config.feature_dim, dtype=torch.float64))


def measure_accuracy(model: WorldClassifier, n: int = 2000, seed: int = 10_000) -> dict[str, float]:
    """Per-head accuracy on ``n`` fresh real images (half filled, half outlined) from ``seed``."""
    images, labels = render_training_set(n, seed)
    preds, _ = predict(model, images)
    return {name: float((preds[name] == labels[name]).double().mean()) for name in HEADS}


def save_classifier(model: WorldClassifier, out_dir, train_info: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + how it was trained) to ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    cfg = asdict(model.config)
    cfg["widths"] = list(cfg["widths"])
    meta = {"architecture": "WorldClassifier", "config": cfg, "feature_dim": model.config.feature_dim,
            "classes": {k: list(v) for k, v in HEADS.items()},
            "input": "float32 (N, 3, 32, 32) in [-1, 1]", "training": train_info or {}}
    write_json(out_dir / CONFIG_FILE, meta, indent=2)
    return out_dir


def load_classifier(path=ASSET_DIR) -> WorldClassifier:
    """Load a classifier saved by :func:`save_classifier` (safetensors only; never unpickles), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise LcmkitError(f"no world evaluator in {path}: expected {WEIGHTS_FILE} and {CONFIG_FILE} "
                          "(train one with `lcmkit world train-classifier`)")
    meta = json.loads((path / CONFIG_FILE).read_text())
    cfg = meta["config"]
    config = ClassifierConfig(widths=tuple(cfg["widths"]), groups=cfg["groups"], heads=dict(cfg["heads"]),
                              image_size=cfg["image_size"])
    if list(config.heads) != list(HEADS):
        raise LcmkitError(f"{path / CONFIG_FILE}: heads {list(config.heads)} do not match the world's {list(HEADS)}")
    model = WorldClassifier(config)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.eval()
