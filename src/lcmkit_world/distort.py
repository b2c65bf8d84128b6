"""Hard negatives: world images whose shape a person would reject for their caption.

Each kind draws the caption's object (its colour, background, style, about its position and size) with a malformed
shape, the failures a guided or distilled model makes: circles drawn as diamonds, rotated squares or ellipses;
squares with pinched (concave), bulging (convex) or rounded sides; triangles pinched or rounded; blobs; shapes cut
by a line; a second object; sizes the world does not have. The strict judge (:mod:`lcmkit_world.evaluate.geometry`)
must call every one of them wrong, and clean renders right.

Shapes are drawn as in :func:`lcmkit_world.world.render`: an inside test on a ``SUPERSAMPLE`` x grid, box-filtered
down; the outlined style keeps the band within ``STROKE`` px of the boundary (a Euclidean distance transform of the
supersampled mask). Everything is deterministic: image i of ``sample(kind, n, seed)`` depends only on
(kind, seed, i).
"""

from __future__ import annotations

import numpy as np

from . import world

#: kind → the caption shapes it applies to (a diamond is a malformed circle; for a square it is a rotated square)
KINDS: dict[str, tuple[str, ...]] = {
    "diamond": ("circle",),
    "rotated-square": ("circle",),
    "ellipse": ("circle",),
    "pinched": ("square", "triangle"),
    "bulging": ("square",),
    "rounded": ("square", "triangle"),
    "blob": world.SHAPES,
    "truncated": world.SHAPES,
    "two-objects": world.SHAPES,
    "wrong-size": world.SHAPES,
}

#: shapes are drawn on a canvas PAD px larger on every side than the image, then cropped, so that a shape the frame
#: cuts keeps its outline where the world's renderer keeps it (the stroke follows the shape, not the frame)
PAD = 8
_N = (world.IMAGE_SIZE + 2 * PAD) * world.SUPERSAMPLE
_C = (np.arange(_N) + 0.5) / world.SUPERSAMPLE - PAD
_X, _Y = np.meshgrid(_C, _C)  # supersample centres, pixel coordinates (x: column, y: row)


def _rotate(x, y, cx, cy, angle):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def _ideal(shape: str, extent: float, cx: float, cy: float) -> np.ndarray:
    """The world's own inside test (supersampled boolean mask) of an undistorted shape."""
    h = extent / 2.0
    if shape == "circle":
        return np.hypot(_X - cx, _Y - cy) <= h
    if shape == "square":
        return (np.abs(_X - cx) <= h) & (np.abs(_Y - cy) <= h)
    y_apex = cy - h
    return (_Y <= cy + h) & ((_Y - y_apex) - 2.0 * np.abs(_X - cx) >= 0)


def _polar(cx: float, cy: float, radius) -> np.ndarray:
    """Inside a star-shaped region whose boundary radius is ``radius(θ)`` around (cx, cy)."""
    r, theta = np.hypot(_X - cx, _Y - cy), np.arctan2(_Y - cy, _X - cx)
    return r <= radius(theta)


def _bowed_polygon(vertices: np.ndarray, bow: float) -> np.ndarray:
    """A convex polygon whose straight sides are bent: ``bow`` > 0 pushes each side's middle outward by ``bow``
    times the side's length (bulging), < 0 pulls it inward (pinched); parabolic, zero at the vertices."""
    inside = np.ones_like(_X, dtype=bool)
    centre = vertices.mean(axis=0)
    for a, b in zip(vertices, np.roll(vertices, -1, axis=0)):
        edge = b - a
        length = np.hypot(*edge)
        normal = np.array([edge[1], -edge[0]]) / length
        if np.dot(centre - a, normal) > 0:  # make the normal point outward
            normal = -normal
        u = ((_X - a[0]) * edge[0] + (_Y - a[1]) * edge[1]) / length**2  # position along the side, 0..1
        offset = bow * length * 4.0 * np.clip(u, 0.0, 1.0) * (1.0 - np.clip(u, 0.0, 1.0))
        inside &= (_X - a[0]) * normal[0] + (_Y - a[1]) * normal[1] <= offset
    return inside


def _vertices(shape: str, extent: float, cx: float, cy: float) -> np.ndarray:
    h = extent / 2.0
    if shape == "square":
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    return np.array([[cx, cy - h], [cx + h, cy + h], [cx - h, cy + h]])  # the world's triangle


def _rounded(shape: str, extent: float, cx: float, cy: float, radius: float) -> np.ndarray:
    """The shape with its corners rounded to ``radius`` px (the inner polygon dilated by ``radius``)."""
    from scipy.ndimage import distance_transform_edt

    verts = _vertices(shape, extent, cx, cy)
    centre = verts.mean(axis=0)
    # shrink the polygon towards its centre until its dilation by `radius` has the original extent
    inner = centre + (verts - centre) * max(0.05, 1.0 - radius / (extent / 2.0) * (1.0 if shape == "square" else 1.6))
    core = _bowed_polygon(inner, 0.0)
    return distance_transform_edt(~core) / world.SUPERSAMPLE <= radius


def _malformed(kind: str, spec: world.ShapeSpec, rng: np.random.Generator) -> np.ndarray:
    """Supersampled mask of the caption's object drawn malformed in the way ``kind`` names."""
    extent = world.SIZES[spec.size] + rng.uniform(-world.JITTER, world.JITTER)
    px, py = world.POSITIONS[spec.position]
    cx, cy = px + rng.uniform(-world.JITTER, world.JITTER), py + rng.uniform(-world.JITTER, world.JITTER)
    h = extent / 2.0
    if kind == "diamond":  # a four-pointed diamond where a circle was asked for (a square turned 45°)
        return (np.abs(_X - cx) + np.abs(_Y - cy)) <= h * rng.uniform(1.05, 1.25)
    if kind == "rotated-square":
        x, y = _rotate(_X, _Y, cx, cy, rng.uniform(np.pi / 12, np.pi / 6) * rng.choice([-1, 1]))
        side = h * rng.uniform(0.85, 0.95)
        return (np.abs(x) <= side) & (np.abs(y) <= side)
    if kind == "ellipse":
        a, b = h * rng.uniform(1.05, 1.2), h * rng.uniform(0.5, 0.7)
        x, y = _rotate(_X, _Y, cx, cy, rng.uniform(0, np.pi))
        return (x / a) ** 2 + (y / b) ** 2 <= 1.0
    if kind == "pinched":  # (a triangle's sides are longer and fewer: it takes a shallower bow)
        depth = rng.uniform(0.15, 0.25) * (1.0 if spec.shape == "square" else 0.6)
        return _bowed_polygon(_vertices(spec.shape, extent * rng.uniform(1.0, 1.1), cx, cy), -depth)
    if kind == "bulging":
        return _bowed_polygon(_vertices(spec.shape, extent * rng.uniform(0.82, 0.92), cx, cy),
                              rng.uniform(0.18, 0.28))
    if kind == "rounded":
        return _rounded(spec.shape, extent, cx, cy, h * rng.uniform(0.65, 0.9))
    if kind == "blob":  # a smooth random star-shaped blob of about the right area
        k = np.arange(2, 5)
        amp, phase = rng.uniform(0.12, 0.25, size=3), rng.uniform(0, 2 * np.pi, size=3)
        scale = h * (1.0 if spec.shape == "circle" else 0.9)
        return _polar(cx, cy, lambda t: scale * (1.0 + (amp[:, None, None] * np.cos(
            k[:, None, None] * t[None] + phase[:, None, None])).sum(0)))
    if kind == "truncated":  # a straight cut removes 30–50 % of the shape's height along a random direction
        angle = rng.uniform(0, 2 * np.pi)
        if spec.shape == "triangle":  # a cut parallel to a side would leave a (smaller) triangle: cut a corner off
            angle = rng.choice([0.0, np.pi]) + rng.uniform(-np.pi / 6, np.pi / 6)
        normal = np.array([np.cos(angle), np.sin(angle)])
        keep = (_X - cx) * normal[0] + (_Y - cy) * normal[1] <= h * rng.uniform(-0.1, 0.3)
        return _ideal(spec.shape, extent, cx, cy) & keep
    if kind == "two-objects":  # the object, and a second copy beside it
        small = extent * rng.uniform(0.5, 0.7)
        for _ in range(50):
            ox, oy = rng.uniform(small / 2 + 1, world.IMAGE_SIZE - small / 2 - 1, size=2)
            if np.hypot(ox - cx, oy - cy) > h + small / 2 + 1.5:
                break
        return _ideal(spec.shape, extent, cx, cy) | _ideal(spec.shape, small, ox, oy)
    if kind == "wrong-size":  # far from both of the world's sizes: tiny, in between, or oversized
        lo, mid, hi = (4.5, 6.5), (13.5, 14.5), (23.5, 26.0)
        choice = rng.integers(3)
        extent = rng.uniform(*(lo, mid, hi)[choice])
        if choice == 2:  # keep an oversized shape inside the frame
            cx, cy = np.clip([cx, cy], extent / 2, world.IMAGE_SIZE - extent / 2)
        return _ideal(spec.shape, extent, cx, cy)
    raise ValueError(f"unknown distortion {kind!r}; one of {', '.join(KINDS)}")


def render(kind: str, spec: world.ShapeSpec, rng: np.random.Generator) -> np.ndarray:
    """One (32, 32, 3) uint8 image: ``spec``'s colours and style, its shape malformed as ``kind``."""
    from scipy.ndimage import distance_transform_edt

    mask = _malformed(kind, spec, rng)
    if spec.style == "outlined":  # the band within STROKE px of the boundary, as the world's outlined style
        mask &= distance_transform_edt(mask) / world.SUPERSAMPLE <= world.STROKE
    n, s = world.IMAGE_SIZE, world.SUPERSAMPLE
    mask = mask[PAD * s:(PAD + n) * s, PAD * s:(PAD + n) * s]
    cov = mask.reshape(n, s, n, s).mean(axis=(1, 3))[..., None]
    bg = np.array(world.BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.array(world.COLOURS[spec.colour], dtype=np.float64)
    return np.round(bg * (1.0 - cov) + fg * cov).astype(np.uint8)


def sample(kind: str, n: int, seed: int = 0, style: str = "filled") -> tuple[np.ndarray, list[world.ShapeSpec]]:
    """``n`` hard negatives of ``kind``: (images (n, 32, 32, 3) uint8, the specs they were drawn for), captions
    uniform over the world's specs whose shape ``kind`` applies to."""
    images = np.empty((n, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    specs = []
    kind_index = list(KINDS).index(kind)
    for i in range(n):
        rng = np.random.default_rng([seed, kind_index, i])
        spec = world.random_spec(rng, style)
        spec = world.ShapeSpec(spec.size, spec.colour, KINDS[kind][rng.integers(len(KINDS[kind]))], spec.position,
                               spec.background, style)
        images[i] = render(kind, spec, rng)
        specs.append(spec)
    return images, specs
