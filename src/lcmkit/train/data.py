"""The data side of lcmkit's training recipes (distillation, LCF fine-tuning, refinement, style LoRAs).

- **sources**: :class:`DataSource` (an imagefolder / webdataset, or a generated dataset registered by a plug-in,
  such as the proving ground's ``world``), :func:`transform` (resize, square crop, flip; SDXL's time ids);
- **streams**: :class:`DataStream`, one process's endless, resumable share of the samples;
- **encoding** (:mod:`lcmkit.train.encode`): batches → latents and text conditioning, with the optional caches;
- :func:`make_data` puts these together for a run; :func:`default_validation_prompts` picks the grid's prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..errors import LcmkitError
from .encode import EMPTY_PROMPT_UNCOND, Encoder, build_latent_cache, build_text_cache, encode_text

if TYPE_CHECKING:
    from .config import TrainingOptions

#: Entry-point group of generated datasets: ``--data NAME`` or ``--data NAME:OPTIONS`` names one. A plug-in
#: registers a factory ``(spec, size, seed) -> dataset`` whose dataset has ``len()``, ``load(i) -> (RGB PIL image,
#: caption)`` (depending only on (seed, i)) and ``captions()`` (every caption it can produce); the factory raises
#: ``LcmkitError`` for options it does not know.
DATASET_ENTRY_POINTS = "lcmkit.datasets"


def generated_dataset_factory(data: str):
    """The factory of the generated dataset ``data`` names, or None when ``data`` names files."""
    from importlib.metadata import entry_points

    name = data.split(":", 1)[0]
    if not name or "/" in name or "." in name:
        return None
    return next((ep.load() for ep in entry_points(group=DATASET_ENTRY_POINTS) if ep.name == name), None)


def is_generated(data: str) -> bool:
    """``data`` names a generated dataset (a plug-in such as ``world``), not files."""
    return generated_dataset_factory(data) is not None


def check_data_spec(data: str) -> None:
    """Refuse a ``data`` that is neither an existing path, a glob / ``{a..b}`` pattern, nor a generated dataset
    (whose factory checks its own options)."""
    factory = generated_dataset_factory(data)
    if factory is not None:
        factory(data, 1, 0)
    elif not any(c in data for c in "*{") and not Path(data).exists():
        from importlib.metadata import entry_points

        names = sorted(ep.name for ep in entry_points(group=DATASET_ENTRY_POINTS))
        generated = f", or a generated dataset ({', '.join(names)})" if names else ""
        raise LcmkitError(f"data {data} not found; pass an imagefolder or .tar shards{generated}")


def check_prompts(prompts, name: str = "validation prompt") -> None:
    """Each of ``prompts`` must be valid text (undecodable command-line bytes are refused in one line, before any
    model is loaded, not at the first validation grid)."""
    from ..inputs import check_text

    for i, prompt in enumerate(prompts or ()):
        check_text(f"{name} {i + 1}", prompt)


# ---------------------------------------------------------------------------------------------------------------
# Data: images (or cached latents) + captions, sharded over processes, resumable by (epoch, position)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    index: int
    caption: str
    pixels: Tensor | None          # (3, R, R) in [-1, 1], None when the latent is cached
    time_ids: tuple[int, ...]      # SDXL micro-conditioning: original (h, w), crop top-left (top, left), target (h, w)


def transform(img, resolution: int, crop: str, flip: bool, rng: np.random.Generator) -> tuple[Tensor, tuple]:
    """Resize the shorter side to ``resolution``, crop a square, maybe flip; also returns SDXL's time ids."""
    from PIL import Image

    from ..data.datasets import crop_box, resize_shorter_side, to_tensor

    original = (img.size[1], img.size[0])  # (height, width)
    img = resize_shorter_side(img, resolution)
    left, top, right, bottom = crop_box(*img.size, resolution, rng if crop == "random" else None)
    img = img.crop((left, top, right, bottom))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img), (*original, top, left, resolution, resolution)


class DataSource:
    """Sample i of the training set as (RGB PIL image, caption); raises ``BadSample`` for unusable ones.

    A generated dataset (:data:`DATASET_ENTRY_POINTS`): ``generated_samples`` samples of seed ``seed``, made on the
    fly, sample i depending only on (seed, i). Otherwise an imagefolder / webdataset via
    :func:`lcmkit.data.datasets.load_dataset` (bad samples counted in ``dataset.skipped`` and limited by its
    ``max_bad_fraction``).
    """

    def __init__(self, cfg: TrainingOptions, resolution: int):
        self.cfg = cfg
        self.dataset = self.generated = None
        factory = generated_dataset_factory(cfg.data)
        if factory is not None:
            self.generated = factory(cfg.data, cfg.generated_samples, cfg.seed)
            self.size = len(self.generated)
        else:
            from ..data.datasets import load_dataset

            self.dataset = load_dataset(cfg.data, caption_key=cfg.caption_key, min_size=max(1, resolution // 2))
            self.size = len(self.dataset)

    def __len__(self) -> int:
        return self.size

    def load(self, i: int):
        return (self.generated if self.dataset is None else self.dataset).load(i)

    def captions(self) -> list[str]:
        """Every caption the data can produce (for text caching)."""
        if self.dataset is None:
            return self.generated.captions()
        return sorted({r.caption.strip() for r in self.dataset.records if r.caption and r.caption.strip()})

    def report(self) -> dict:
        """Bad-data accounting for the summary: skipped samples (and shard problems) by reason, images converted
        to RGB by original mode, samples looked at (over all passes, this process)."""
        ds = self.dataset
        if ds is None:
            return {"data_skipped": {}, "data_converted": {}, "data_seen": 0}
        return {"data_skipped": dict(ds.skipped), "data_converted": dict(ds.converted), "data_seen": ds.seen}

    def count_bad(self, reason: str) -> None:
        if self.dataset is None:
            return
        ds = self.dataset
        ds.skipped[reason] += 1
        if ds.seen >= ds.min_checked and ds.bad / ds.seen > ds.max_bad_fraction:
            raise LcmkitError(f"{ds.name}: {ds.bad} of {ds.seen} samples were unusable ({dict(ds.skipped)}), more "
                              f"than max_bad_fraction={ds.max_bad_fraction:g}; fix the data")


class DataStream:
    """This process's endless stream of samples.

    Pass ``epoch`` visits the permutation ``rng([seed, epoch])`` of all samples; process r of W takes positions
    r, r + W, … of it. The state is (epoch, position in this process's share): saved in checkpoints, so a resumed
    run continues with exactly the next sample. Augmentation of sample i in pass e uses ``rng([seed, e, i])``.
    """

    def __init__(self, source: DataSource, cfg: TrainingOptions, resolution: int, rank: int, world_size: int,
                 latent_cache: dict | None = None):
        from ..data.datasets import BadSample

        self.BadSample = BadSample
        self.source, self.cfg, self.resolution = source, cfg, resolution
        self.rank, self.world_size = rank, world_size
        self.latent_cache = latent_cache
        self.epoch, self.position = 0, 0
        self._share: list[int] | None = None

    def share(self) -> list[int]:
        if self._share is None:
            order = np.random.default_rng([self.cfg.seed, self.epoch]).permutation(len(self.source))
            self._share = [int(i) for i in order[self.rank::self.world_size]]
            if not self._share:
                raise LcmkitError(f"{len(self.source)} samples cannot be shared by {self.world_size} processes")
        return self._share

    def state(self) -> tuple[int, int]:
        return self.epoch, self.position

    def restore(self, epoch: int, position: int) -> None:
        self.epoch, self.position, self._share = epoch, position, None

    def next_sample(self) -> Sample:
        misses = 0  # consecutive unusable samples: a whole share of them means no usable data at all
        while True:
            share = self.share()
            if self.position >= len(share):
                self.epoch, self.position, self._share = self.epoch + 1, 0, None
                continue
            i = share[self.position]
            self.position += 1
            if self.latent_cache is not None:
                entry = self.latent_cache.get(i)
                sample = None if entry is None else Sample(i, entry["caption"], None, entry["time_ids"])
            else:
                sample = self.load(i, self.epoch)
            if sample is not None:
                return sample
            misses += 1
            if misses > len(share):
                raise LcmkitError(f"no usable sample in {self.cfg.data} (skipped: "
                                  f"{dict(self.source.dataset.skipped) if self.source.dataset else {}})")

    def load(self, i: int, epoch: int) -> Sample | None:
        """Sample i with pass-``epoch`` augmentation, or None (counted) when it is unusable."""
        if self.source.dataset is not None:
            self.source.dataset.seen += 1
        try:
            img, caption = self.source.load(i)
        except self.BadSample as e:
            self.source.count_bad(e.reason)
            return None
        rng = np.random.default_rng([self.cfg.seed, epoch, i])
        pixels, time_ids = transform(img, self.resolution, self.cfg.crop, self.cfg.flip, rng)
        return Sample(i, caption, pixels, time_ids)

    def next_batch(self, batch_size: int) -> list[Sample]:
        return [self.next_sample() for _ in range(batch_size)]


# ---------------------------------------------------------------------------------------------------------------
# A run's data: stream + encoder, validation prompts
# ---------------------------------------------------------------------------------------------------------------

def make_data(cfg, pipe, arch: str, device: torch.device, resolution: int, rank: int, world_size: int,
              progress: bool) -> tuple[DataSource, DataStream, Encoder]:
    """This process's data stream and the batch encoder (latent and text caches as configured); the encoder's
    unconditional embedding is "" (SD, SD3, FLUX) / zeros (SDXL), as in distillation."""
    source = DataSource(cfg, resolution)
    stream = DataStream(source, cfg, resolution, rank, world_size)
    if cfg.cache_latents:
        stream.latent_cache = build_latent_cache(source, stream, pipe, progress)
    cache_text = cfg.cache_text if cfg.cache_text is not None else source.generated is not None
    encoder = Encoder(pipe, arch, device, latent_cache=stream.latent_cache,
                      text_cache=build_text_cache(source.captions(), pipe, arch) if cache_text else None)
    if arch in EMPTY_PROMPT_UNCOND:
        encoder.uncond_hidden, encoder.uncond_pooled = encode_text(pipe, arch, [""])
    return source, stream, encoder


def default_validation_prompts(cfg, source: DataSource, resolution: int, stream: DataStream) -> list[str]:
    """``cfg.validation_prompts``, else the first (≤ 4, distinct) captions of the data: the same on every run."""
    if cfg.validation_prompts:
        check_prompts(cfg.validation_prompts)
        return list(cfg.validation_prompts)
    probe = DataStream(source, cfg, resolution, 0, 1, stream.latent_cache)
    return list(dict.fromkeys(s.caption for s in probe.next_batch(min(4, len(source)))))
