"""World metrics: how well generated images follow their prompts, and how real they look.

All metrics use the shipped attribute classifier (:func:`load_evaluator`, see
:mod:`lcmkit_world.evaluate.classifier`). Images are uint8 ``(N, 32, 32, 3)`` or float in [-1, 1] (NHWC or NCHW).

* :func:`prompt_scores`: per-attribute accuracy against the :class:`~lcmkit_world.world.ShapeSpec` each image
  was prompted with, prompt accuracy (all five caption attributes right), style rate (fraction the classifier
  judges outlined) and style accuracy (against ``spec.style``).
* :func:`world_fid`: world-FID, the Fréchet distance (Heusel et al. 2017, the FID formula)
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussians fitted to the classifier's penultimate
  features of the images and of ``n_real`` real images rendered with a fixed seed (``REAL_SEED``). Float64
  throughout; ``scipy.linalg.sqrtm``, real part kept. It is small-sample biased like FID: compare numbers made
  with the same ``n``, and against :func:`fid_floor` (two disjoint real sets of the same size).
* :func:`trajectory_error`: mean per-image RMSE between two image sets, in [-1, 1] units.

Everything is deterministic: the real sets come from fixed seeds, the classifier is in eval mode with
GroupNorm (per-image), and nothing random happens at evaluation time.

Run ``python -m lcmkit_world.evaluate.metrics`` to print the shipped evaluator's accuracy on fresh real images and
the real-vs-real world-FID floor.
"""

from __future__ import annotations

import warnings
import weakref
from functools import lru_cache

import numpy as np
import torch

from lcmkit.errors import LcmkitError
from lcmkit_world import world
from lcmkit_world.evaluate.classifier import (
    ASSET_DIR,
    WorldClassifier,
    as_model_input,
    load_classifier,
    measure_accuracy,
    predict,
    spec_labels,
)

#: Seed of the real reference set for world-FID (images 0..n-1); :func:`fid_floor` uses images n..2n-1.
REAL_SEED = 314_159
#: Default size of the real reference set.
N_REAL = 2000


@lru_cache(maxsize=4)
def load_evaluator(path: str | None = None) -> WorldClassifier:
    """The shipped world classifier (or the one saved in ``path``), loaded once per process."""
    return load_classifier(ASSET_DIR if path is None else path)


def _model(model: WorldClassifier | None) -> WorldClassifier:
    return load_evaluator() if model is None else model


def prompt_scores(images, specs, model: WorldClassifier | None = None, named=None) -> dict[str, float]:
    """Accuracy per caption attribute, ``prompt`` (every named attribute right), ``style_rate``, ``style_accuracy``.

    ``named``: per image, the attributes its prompt names (open captions, :func:`lcmkit_world.world.caption`);
    default all five. An attribute's accuracy is over the prompts that name it (NaN if none does).
    """
    x = as_model_input(images)
    if len(x) != len(specs):
        raise LcmkitError(f"{len(x)} images but {len(specs)} specs")
    if named is not None and len(named) != len(specs):
        raise LcmkitError(f"{len(named)} attribute sets but {len(specs)} specs")
    if len(x) == 0:
        raise LcmkitError("no images to score")
    preds, _ = predict(_model(model), x)
    labels = spec_labels(specs)
    correct = {name: preds[name] == labels[name] for name in world.ATTRIBUTES}
    asked = {name: torch.tensor([name in n for n in named], dtype=torch.bool) if named is not None
             else torch.ones(len(specs), dtype=torch.bool) for name in world.ATTRIBUTES}
    out = {name: float(c[asked[name]].double().mean()) if asked[name].any() else float("nan")
           for name, c in correct.items()}
    right = torch.stack([c | ~asked[name] for name, c in correct.items()])  # an attribute not asked for is no error
    out["prompt"] = float(right.all(dim=0).double().mean())
    out["style_rate"] = float((preds["style"] == world.STYLES.index("outlined")).double().mean())
    out["style_accuracy"] = float((preds["style"] == labels["style"]).double().mean())
    return out


# --- Fréchet distance --------------------------------------------------------------------------------------
def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, N - 1) of features ``(N, D)``, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise LcmkitError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    ``sqrtm(sigma1 @ sigma2)`` can come back complex with tiny imaginary parts (round-off on a singular
    product); the real part is used. If it is not finite, ``eps * I`` is added to both covariances first.
    """
    from scipy import linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(len(s1))
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)  # imaginary parts are numerical noise for PSD inputs
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def features(images, model: WorldClassifier | None = None) -> np.ndarray:
    """The classifier's penultimate features of ``images``, float64 ``(N, feature_dim)``."""
    return predict(_model(model), images)[1].numpy()


# real-image statistics per model and (n, seed, style, start); weak keys: a dropped model frees its entries
_REAL_STATS: "weakref.WeakKeyDictionary[WorldClassifier, dict]" = weakref.WeakKeyDictionary()


def real_statistics(n: int = N_REAL, seed: int = REAL_SEED, style: str = "filled", start: int = 0,
                    model: WorldClassifier | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of real images ``start .. start+n-1`` of ``world.sample(seed, style)``.

    Cached in memory per process (per model and arguments); the arrays are read-only.
    """
    if n < 2:
        raise LcmkitError(f"need at least 2 real images, got {n}")
    m = _model(model)
    cache = _REAL_STATS.setdefault(m, {})
    key = (n, seed, style, start)
    if key not in cache:
        images, _ = world.sample(n, seed=seed, style=style, start=start)
        mu, sigma = gaussian_stats(features(images, m))
        mu.setflags(write=False)
        sigma.setflags(write=False)
        cache[key] = (mu, sigma)
    return cache[key]


def world_fid(images, n_real: int = N_REAL, seed: int = REAL_SEED, style: str = "filled",
              model: WorldClassifier | None = None) -> float:
    """World-FID of ``images`` against ``n_real`` real images (``seed``, ``style``; statistics cached)."""
    mu, sigma = gaussian_stats(features(images, model))
    mu_r, sigma_r = real_statistics(n_real, seed, style, model=model)
    return frechet_distance(mu, sigma, mu_r, sigma_r)


def fid_floor(n: int = N_REAL, seed: int = REAL_SEED, style: str = "filled",
              model: WorldClassifier | None = None) -> float:
    """World-FID between two disjoint real sets of ``n`` images (indices 0..n-1 and n..2n-1 of ``seed``).

    The best score a perfect generator can expect at this sample size: report it next to :func:`world_fid`
    computed with the same ``n``.
    """
    mu_a, sigma_a = real_statistics(n, seed, style, start=0, model=model)
    mu_b, sigma_b = real_statistics(n, seed, style, start=n, model=model)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def trajectory_error(a, b) -> float:
    """Mean over images of the per-image RMSE between two image sets of the same shape, in [-1, 1] units.

    Accepts uint8 or [-1, 1] float images (converted as in :func:`~lcmkit_world.evaluate.classifier.as_model_input`),
    so e.g. a student's and its teacher's samples from the same noise can be compared directly.
    """
    x, y = as_model_input(a).double(), as_model_input(b).double()
    if x.shape != y.shape:
        raise LcmkitError(f"image sets differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if len(x) == 0:
        raise LcmkitError("no images to compare")
    return float((x - y).square().mean(dim=(1, 2, 3)).sqrt().mean())


def evaluate_world(images, specs, n_real: int = N_REAL, style: str = "filled",
                   model: WorldClassifier | None = None, named=None) -> dict[str, float]:
    """:func:`prompt_scores` plus ``world_fid`` (against real ``style`` images) in one dict."""
    out = prompt_scores(images, specs, model, named)
    out["world_fid"] = world_fid(images, n_real, style=style, model=model)
    return out


def report(n: int = 2000, seed: int = 271_828, n_real: int = N_REAL) -> dict:
    """The shipped evaluator's per-head accuracy on ``n`` fresh real images and the world-FID floor."""
    model = load_evaluator()
    return {"accuracy": measure_accuracy(model, n, seed),
            "fid_floor": {style: fid_floor(n_real, style=style, model=model) for style in world.STYLES}}


if __name__ == "__main__":
    import json

    torch.set_num_threads(1)
    print(json.dumps(report(), indent=2))
