"""World metrics: how well generated images follow their prompts, and how real they look.

The judge (:func:`judgements`) reads each image twice: the shipped attribute classifier (:func:`load_evaluator`,
:mod:`lcmkit_world.evaluate.classifier`) reads its attributes, and the geometric fit
(:mod:`lcmkit_world.evaluate.geometry`) checks that it holds one well-formed world shape of the prompted kind. The
**strict verdict** is both. Images are uint8 ``(N, 32, 32, 3)`` or float in [-1, 1] (NHWC or NCHW).

* :func:`prompt_scores`: ``prompt``, the strict verdict's rate (an image counts when every attribute its prompt
  names is right and its shape is well formed); ``attributes``, the classifier's verdict alone; ``well_formed``;
  ``fidelity`` (mean IoU with the ideal shape); per-attribute accuracy, style rate and style accuracy.
* :func:`world_fid`: world-FID, the Fréchet distance (Heusel et al. 2017, the FID formula)
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussians fitted to the features of the images and of
  ``n_real`` real images rendered with a fixed seed (``REAL_SEED``): the classifier's penultimate features and two
  geometric descriptors (:data:`GEOMETRY_WEIGHTS`), so that distorted shapes move it. Float64 throughout;
  ``scipy.linalg.sqrtm``, real part kept. It is small-sample biased like FID: compare numbers made with the same
  ``n``, and against :func:`fid_floor` (two disjoint real sets of the same size).
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
from lcmkit_world.evaluate import geometry
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


#: the geometric descriptors appended to the classifier's features for world-FID, and their weights: the best
#: ideal-shape IoU (× 40: its spread on real images then matches a classifier feature's) and the fitted extent's
#: distance to the nearer world size (px)
GEOMETRY_WEIGHTS = {"best_iou": 40.0, "size_gap": 1.0}


def _uint8(images) -> np.ndarray:
    """Images as uint8 (N, 32, 32, 3), from any input :func:`as_model_input` takes."""
    x = as_model_input(images)
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read(images, model: WorldClassifier | None = None):
    """What the judge reads of each image: the classifier's predictions and features, and the geometric fit of the
    three ideal shapes made with the background, colour and style the classifier reads (the styles are returned
    too)."""
    x = as_model_input(images)
    preds, feats = predict(_model(model), x)
    background = np.array(list(world.BACKGROUNDS.values()))[preds["background"].numpy()]
    colour = np.array(list(world.COLOURS.values()))[preds["colour"].numpy()]
    styles = [world.STYLES[i] for i in preds["style"].numpy()]
    return preds, feats, geometry.judge(_uint8(x), background, colour, styles), styles


def judgements(images, specs, model: WorldClassifier | None = None, named=None) -> dict[str, np.ndarray]:
    """The strict judge, per image: ``attributes`` (every attribute the prompt names is what the classifier reads),
    ``well_formed`` (one well-formed world shape of the prompted kind, :func:`geometry.well_formed`, fitted with
    the colours the classifier reads), ``strict`` (both), ``fidelity`` (IoU with the ideal prompted shape at its
    fitted size and position), the classifier's ``predictions`` and ``features``, and the ``geometry`` descriptors.

    ``named``: per image, the attributes its prompt names (open captions); default all five.
    """
    x = as_model_input(images)
    if len(x) != len(specs):
        raise LcmkitError(f"{len(x)} images but {len(specs)} specs")
    if named is not None and len(named) != len(specs):
        raise LcmkitError(f"{len(named)} attribute sets but {len(specs)} specs")
    if len(x) == 0:
        raise LcmkitError("no images to score")
    preds, feats, fitted, _ = read(x, model)
    labels = spec_labels(specs)
    asked = {name: np.array([name in n for n in named]) if named is not None else np.ones(len(specs), bool)
             for name in world.ATTRIBUTES}
    correct = {name: (preds[name] == labels[name]).numpy() for name in world.ATTRIBUTES}
    attributes = np.stack([correct[n] | ~asked[n] for n in world.ATTRIBUTES]).all(0)
    shape = labels["shape"].numpy()
    rows = np.arange(len(shape))
    formed = geometry.well_formed(fitted, shape)
    descriptors = np.stack([fitted["iou"].max(1) * GEOMETRY_WEIGHTS["best_iou"],
                            geometry.nearest_size_gap(fitted["extent"][rows, fitted["iou"].argmax(1)])
                            * GEOMETRY_WEIGHTS["size_gap"]], 1)
    return {"attributes": attributes, "well_formed": formed, "strict": attributes & formed,
            "fidelity": fitted["iou"][rows, shape], "correct": correct, "asked": asked,
            "predictions": {k: v.numpy() for k, v in preds.items()}, "features": feats.numpy(),
            "geometry": descriptors}


def prompt_scores(images, specs, model: WorldClassifier | None = None, named=None,
                  judged: dict | None = None) -> dict[str, float]:
    """Accuracy per caption attribute; ``prompt``: the strict verdict's rate (every named attribute right and one
    well-formed shape, :func:`judgements`); ``attributes``: the attribute verdict alone (the classifier's, as the
    evaluator scored before it judged form); ``well_formed``; ``fidelity`` (mean IoU with the ideal shape);
    ``style_rate`` and ``style_accuracy``. An attribute's accuracy is over the prompts that name it (NaN if none
    does). ``judged``: :func:`judgements` already made for these images."""
    j = judgements(images, specs, model, named) if judged is None else judged
    out = {name: float(j["correct"][name][j["asked"][name]].mean()) if j["asked"][name].any() else float("nan")
           for name in world.ATTRIBUTES}
    out["prompt"] = float(j["strict"].mean())
    out["attributes"] = float(j["attributes"].mean())
    out["well_formed"] = float(j["well_formed"].mean())
    out["fidelity"] = float(j["fidelity"].mean())
    style_labels = np.array([world.STYLES.index(s.style) for s in specs])
    out["style_rate"] = float((j["predictions"]["style"] == world.STYLES.index("outlined")).mean())
    out["style_accuracy"] = float((j["predictions"]["style"] == style_labels).mean())
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


def features_of(judged: dict, with_geometry: bool = True) -> np.ndarray:
    """The world-FID features of a :func:`judgements` result (``with_geometry=False``: the classifier's alone)."""
    if not with_geometry:
        return judged["features"]
    return np.concatenate([judged["features"], judged["geometry"]], axis=1)


def features(images, model: WorldClassifier | None = None, specs=None, judged: dict | None = None) -> np.ndarray:
    """World-FID's features of ``images``, float64 (N, feature_dim + 2): the classifier's penultimate features and
    the geometric descriptors of :func:`judgements` (:data:`GEOMETRY_WEIGHTS`), which move when shapes distort.
    ``specs`` only serve the judgement (the descriptors do not depend on them); ``judged``: one already made."""
    if judged is None:
        if specs is None:  # any spec will do: neither the features nor the descriptors read it
            specs = [world.ShapeSpec("small", "red", "circle", "center", "black")] * len(as_model_input(images))
        judged = judgements(images, specs, model)
    return features_of(judged)


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
        images, specs = world.sample(n, seed=seed, style=style, start=start)
        mu, sigma = gaussian_stats(features(images, m, specs))
        mu.setflags(write=False)
        sigma.setflags(write=False)
        cache[key] = (mu, sigma)
    return cache[key]


def world_fid(images, n_real: int = N_REAL, seed: int = REAL_SEED, style: str = "filled",
              model: WorldClassifier | None = None, judged: dict | None = None) -> float:
    """World-FID of ``images`` against ``n_real`` real images (``seed``, ``style``; statistics cached)."""
    mu, sigma = gaussian_stats(features(images, model, judged=judged))
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
    """:func:`prompt_scores` plus ``world_fid`` (against real ``style`` images) in one dict, from one judgement."""
    judged = judgements(images, specs, model, named)
    out = prompt_scores(images, specs, model, named, judged=judged)
    out["world_fid"] = world_fid(images, n_real, style=style, model=model, judged=judged)
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
