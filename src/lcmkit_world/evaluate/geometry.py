"""The strict judge's eye: does the image hold one well-formed world shape? Geometry, no learned weights.

For an image and the colours it should have (background and object colour), the foreground coverage is
α = clip(((p − bg)·(fg − bg)) / |fg − bg|², 0, 1) per pixel. Each of the world's three ideal shapes (the world's own
renderer, anti-aliased, filled or outlined) is fitted to α over size and position (mass and centroid give the start,
a hill climb on a 0.25 px grid the best fit), and scored by the soft IoU Σ min(α, T) / Σ max(α, T) with the
fitted template T. The fit reports, per shape, the IoU, the fitted extent and centre.

An outlined image is fitted as the region its outline encloses (:func:`fill_outline`), or, where the frame cuts
the outline open, as an outline. Before the IoU both maps'
edges are steepened (:func:`sharpen`), so that a blurred edge (a VAE decode) lies where the sharp one did.

A shape is **well formed** (:func:`well_formed`) when the ideal shape asked for fits (almost) best, its IoU
clears the threshold of its (shape, form, size class) (:func:`thresholds`, calibrated on clean renders and VAE
reconstructions, validated on held-out ones and on the hard negatives of :mod:`lcmkit_world.distort` by
``lcmkit bench judge``), and its fitted extent lies within :data:`SIZE_TOLERANCE` px of one of the world's sizes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lcmkit_world import world

#: the template bank's grid: extents (px) and sub-pixel centre offsets, both in steps of STEP px
STEP = 0.25
EXTENTS = np.arange(3.0, 30.0 + STEP / 2, STEP)
FRACTIONS = np.arange(0.0, 1.0, STEP)
CANVAS = 2 * world.IMAGE_SIZE  # templates are drawn centred on a canvas twice the image, then windowed
#: templates are drawn at this supersampling (the world renders at 8; 4 keeps the bank quick to build)
TEMPLATE_SUPERSAMPLE = 4
#: the calibrated minimum IoU per (shape, style, size class), written by ``lcmkit bench judge --calibrate``
THRESHOLDS_FILE = world.ASSETS / "world-evaluator" / "judge.json"
#: slope of the edge steepening applied to coverage maps and templates before the IoU (1 = none)
SHARPEN = 2.0
#: coverage above which a pixel belongs to an outline when its enclosed region is filled (below 0.5: a stroke the
#: frame thins and a VAE then blurs still closes)
FILL_LEVEL = 0.25
#: an outline is closed when the region it encloses has this many times its own coverage (a 2 px outline of the
#: world's smallest shape encloses 1.5 times it; one the frame cuts open encloses nothing more)
CLOSED_RATIO = 1.2
#: a fitted extent this far (px) from both of the world's sizes is a wrong size (their jitter is ±1 px)
SIZE_TOLERANCE = 2.0
#: the prompted shape must fit within this IoU of the best-fitting one (0: it must fit best)
BEST_MARGIN = 0.0
#: hill-climbing: first in steps of 2 grid points (0.5 px), then of 1 (0.25 px); at most this many moves each
_WALK = ((2, 12), (1, 6))
_MOVES = np.array([(de, dx, dy) for de in (-1, 0, 1) for dx in (-1, 0, 1) for dy in (-1, 0, 1)])


@lru_cache(maxsize=None)
def templates(shape: str, style: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(windows, mass, centroid offset) of the ideal ``shape``: ``windows[e, fy, fx, oy, ox]`` is the (32, 32)
    coverage of extent ``EXTENTS[e]`` centred at (ix + FRACTIONS[fx], iy + FRACTIONS[fy]) for ox = 32 − ix,
    oy = 32 − iy (a strided view, no copy); ``mass[e]`` its total coverage and ``offset[e]`` (dx, dy) its centroid
    minus its centre (a triangle's centroid lies below its centre)."""
    spec = world.ShapeSpec("small", "red", shape, "center", "black", style)
    size, half = CANVAS, CANVAS // 2
    bank = np.empty((len(EXTENTS), len(FRACTIONS), len(FRACTIONS), size, size), dtype=np.float32)
    for e, extent in enumerate(EXTENTS):
        for j, fy in enumerate(FRACTIONS):
            for i, fx in enumerate(FRACTIONS):
                bank[e, j, i] = world._coverage(spec, float(extent), half + fx, half + fy, size=size,
                                                supersample=TEMPLATE_SUPERSAMPLE)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    base = bank[:, 0, 0]
    mass = base.sum(axis=(1, 2))
    offset = np.stack([(base * xs).sum(axis=(1, 2)) / mass - half, (base * ys).sum(axis=(1, 2)) / mass - half], 1)
    windows = np.lib.stride_tricks.sliding_window_view(bank, (world.IMAGE_SIZE, world.IMAGE_SIZE), axis=(-2, -1))
    return windows, mass, offset


def thresholds(path=None) -> dict[tuple[str, str, str], float]:
    """The minimum IoU of a well-formed shape per (shape, style, size class) from ``path`` (default: the shipped
    calibration, :data:`THRESHOLDS_FILE`)."""
    import json
    from pathlib import Path

    data = json.loads(Path(path or THRESHOLDS_FILE).read_text())
    return {tuple(k.split("/")): float(v) for k, v in data["iou_thresholds"].items()}


def _closed_by_the_frame(mask: np.ndarray) -> np.ndarray:
    """``mask`` (32, 32) in a frame one pixel wider, the frame set along each image edge between the first and the
    last mask pixel on that edge: an outline the frame cuts open is closed along the cut, while the background
    between a shape and an image corner stays open to the rest of the frame."""
    n = mask.shape[0]
    padded = np.zeros((n + 2, n + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    for edge, line in (("top", mask[0]), ("bottom", mask[-1]), ("left", mask[:, 0]), ("right", mask[:, -1])):
        hit = np.flatnonzero(line)
        if len(hit) < 2:
            continue
        span = slice(hit[0] + 1, hit[-1] + 2)
        if edge == "top":
            padded[0, span] = True
        elif edge == "bottom":
            padded[-1, span] = True
        elif edge == "left":
            padded[span, 0] = True
        else:
            padded[span, -1] = True
    return padded


def fill_outline(alpha: np.ndarray) -> np.ndarray:
    """The region an outline encloses, (N, 32, 32): α with the holes of its α ≥ :data:`FILL_LEVEL` mask filled, so an outlined
    shape is fitted as the filled shape it bounds (a 2 px stroke blurs away under a VAE; the region it bounds
    does not). Where the frame cuts an outline, the cut is closed along the frame first. An open outline encloses
    nothing and stays as it is."""
    from scipy.ndimage import binary_dilation, binary_fill_holes

    # the enclosed holes and the stroke's inner edge (one pixel around them) become 1; the stroke's outer edge keeps
    # its own soft coverage, so the region's edge stays where the outline's was
    out = alpha.copy()
    for i, a in enumerate(alpha):
        m = _closed_by_the_frame(a >= FILL_LEVEL)
        filled = binary_fill_holes(m)
        inside = binary_dilation(filled & ~m) & filled
        out[i] = np.maximum(a, inside[1:-1, 1:-1])
    return out


def coverage(images: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """α (N, 32, 32) in [0, 1]: each pixel's position on the line from ``background`` to ``colour`` (N, 3) RGB."""
    p = images.astype(np.float64)
    bg, fg = background[:, None, None, :].astype(np.float64), colour[:, None, None, :].astype(np.float64)
    d = fg - bg
    return np.clip(((p - bg) * d).sum(-1) / np.maximum((d * d).sum(-1), 1.0), 0.0, 1.0)


def _iou(alpha: np.ndarray, windows: np.ndarray, e: np.ndarray, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Soft IoU of α (N, 32, 32) with the templates at extent index ``e`` and centre (qx, qy)·STEP, each (N, K)."""
    per_px = round(1 / STEP)
    ix, iy = qx // per_px, qy // per_px
    half = CANVAS // 2
    t = sharpen(windows[e, qy % per_px, qx % per_px, half - iy, half - ix])            # (N, K, 32, 32)
    a = alpha[:, None]
    return np.minimum(a, t).sum(axis=(-2, -1)) / np.maximum(np.maximum(a, t).sum(axis=(-2, -1)), 1e-9)


def sharpen(coverage: np.ndarray) -> np.ndarray:
    """Edges steepened around 0.5 by :data:`SHARPEN` (both the image's coverage and the templates): a blurred edge
    (a VAE's decode) then lies where the sharp one did, while the shape of the region is kept."""
    if SHARPEN == 1.0:
        return coverage
    return np.clip((coverage - 0.5) * SHARPEN + 0.5, 0.0, 1.0)


def fit(alpha: np.ndarray, shape: str, style: str) -> dict[str, np.ndarray]:
    """Best fit of the ideal ``shape`` to each coverage map α (N, 32, 32): ``iou``, ``extent``, ``cx``, ``cy``
    (N,) float64. From each start (extent, with the centre α's centroid gives) it climbs the IoU over
    (extent, cx, cy) on the template grid, coarse then fine, and keeps the best. An empty map scores IoU 0."""
    windows, mass, offset = templates(shape, style)
    alpha = sharpen(alpha)
    n = len(alpha)
    ys, xs = np.mgrid[0:world.IMAGE_SIZE, 0:world.IMAGE_SIZE] + 0.5
    m = alpha.sum(axis=(1, 2))
    safe = np.maximum(m, 1e-9)
    limit = round(world.IMAGE_SIZE / STEP)
    rows = np.arange(n)
    result = None
    # three starts: the extent whose ideal mass matches α's, and each of the world's sizes (a shape the frame cuts
    # has less mass than its extent gives, and a lone start can settle on a smaller shape inside an outline)
    starts = [np.abs(mass[None, :] - m[:, None]).argmin(1)]
    starts += [np.full(n, np.abs(EXTENTS - size).argmin()) for size in world.SIZES.values()]
    for e in starts:
        qx = np.clip(np.round(((alpha * xs).sum(axis=(1, 2)) / safe - offset[e, 0]) / STEP), 0, limit).astype(int)
        qy = np.clip(np.round(((alpha * ys).sum(axis=(1, 2)) / safe - offset[e, 1]) / STEP), 0, limit).astype(int)
        best = _iou(alpha, windows, e[:, None], qx[:, None], qy[:, None])[:, 0]
        for stride, moves in _WALK:
            for _ in range(moves):
                ce = np.clip(e[:, None] + stride * _MOVES[None, :, 0], 0, len(EXTENTS) - 1)
                cx = np.clip(qx[:, None] + stride * _MOVES[None, :, 1], 0, limit)
                cy = np.clip(qy[:, None] + stride * _MOVES[None, :, 2], 0, limit)
                scores = _iou(alpha, windows, ce, cx, cy)
                k = scores.argmax(1)
                better = scores[rows, k] > best + 1e-12
                if not better.any():
                    break
                e, qx, qy = (np.where(better, v[rows, k], old) for v, old in ((ce, e), (cx, qx), (cy, qy)))
                best = np.maximum(best, scores[rows, k])
        if result is None:
            result = [best, e, qx, qy]
        else:
            take = best > result[0]
            result = [np.where(take, new, old) for new, old in zip((best, e, qx, qy), result)]
    best, e, qx, qy = result
    return {"iou": np.where(m > 0.5, best, 0.0), "extent": EXTENTS[e], "cx": qx * STEP, "cy": qy * STEP}


def judge(images: np.ndarray, background: np.ndarray, colour: np.ndarray, style: list[str] | str,
          batch: int = 128) -> dict[str, np.ndarray]:
    """Fit all three shapes to uint8 images (N, 32, 32, 3) with the given colours (N, 3) and styles: ``iou``
    (N, 3) in :data:`lcmkit_world.world.SHAPES` order, ``extent``, ``cx``, ``cy`` (N, 3), and ``form`` (N,): how
    each was fitted, ``filled``; ``outlined`` (a closed outline, fitted as the filled region it encloses,
    :func:`fill_outline`); or ``outlined-open`` (an outline the frame cuts open: the outline itself is fitted)."""
    n = len(images)
    styles = np.array([style] * n if isinstance(style, str) else list(style))
    out = {k: np.zeros((n, len(world.SHAPES))) for k in ("iou", "extent", "cx", "cy")}
    alpha = coverage(images, background, colour)
    form = np.array(["filled"] * n, dtype=object)
    outlined = np.flatnonzero(styles == "outlined")
    if len(outlined):
        filled = fill_outline(alpha[outlined])
        closed = filled.sum(axis=(1, 2)) > CLOSED_RATIO * alpha[outlined].sum(axis=(1, 2))
        alpha[outlined[closed]] = filled[closed]
        form[outlined] = np.where(closed, "outlined", "outlined-open")
    for kind in ("filled", "outlined", "outlined-open"):
        rows = np.flatnonzero(form == kind)
        templates_style = "outlined" if kind == "outlined-open" else "filled"
        for start in range(0, len(rows), batch):
            idx = rows[start:start + batch]
            for s, shape in enumerate(world.SHAPES):
                r = fit(alpha[idx], shape, templates_style)
                for k in out:
                    out[k][idx, s] = r[k]
    out["form"] = form.astype(str)
    return out


def nearest_size_gap(extent: np.ndarray) -> np.ndarray:
    """Distance (px) from each fitted extent to the nearer of the world's sizes."""
    sizes = np.array(list(world.SIZES.values()))
    return np.abs(np.asarray(extent)[..., None] - sizes).min(-1)


def size_class(extent: np.ndarray) -> np.ndarray:
    """The world size (name) nearest each fitted extent."""
    names, sizes = list(world.SIZES), np.array(list(world.SIZES.values()))
    return np.array(names)[np.abs(np.asarray(extent)[..., None] - sizes).argmin(-1)]


def well_formed(fitted: dict[str, np.ndarray], shape_index: np.ndarray,
                limits: dict[tuple[str, str, str], float] | None = None) -> np.ndarray:
    """Per image (bool, N): the ideal shape asked for (``shape_index``) fits within :data:`BEST_MARGIN` of the best
    one, its IoU clears
    the calibrated threshold of its (shape, form, size class) (``limits``, default :func:`thresholds`; the form is
    how :func:`judge` fitted it), and its extent is one of the world's sizes (within :data:`SIZE_TOLERANCE`)."""
    limits = thresholds() if limits is None else limits
    n = len(shape_index)
    styles = fitted["form"]
    rows = np.arange(n)
    extent = fitted["extent"][rows, shape_index]
    iou = fitted["iou"][rows, shape_index]
    threshold = np.array([limits.get((world.SHAPES[s], st, size), 1.01) for s, st, size in
                          zip(shape_index, styles, size_class(extent))])
    best = iou >= fitted["iou"].max(1) - BEST_MARGIN
    return best & (iou >= threshold) & (nearest_size_gap(extent) <= SIZE_TOLERANCE)
