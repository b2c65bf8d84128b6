"""The built-in "shapes" world: procedural captioned 32x32 images.

One object on a plain background, five attributes (size, colour, shape, position, background) plus a style
(filled, or outlined with a 2 px stroke). The spec is fixed by the project's world issue; every number below
is from it. Coordinates are continuous pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1), so the
centre of a 32x32 image is (16, 16). Shapes are drawn at ``SUPERSAMPLE`` x resolution and box-filtered down,
which gives anti-aliased edges.

Everything is deterministic: image ``i`` of a set made with ``seed`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 8
STROKE = 2.0  # outlined style: stroke width in pixels
JITTER = 1.0  # +-1 px on size and on position

SIZES = {"small": 10.0, "large": 18.0}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "center": (16.0, 16.0),
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
STYLES = ("filled", "outlined")

#: The five attributes a caption names, in caption order, with their class names (classifier label order).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
#: Where lcmkit ships the world's teachers (diffusers pipeline folders)
ASSETS = Path(__file__).resolve().parent / "assets"


def shipped_teacher(prompts: str = "exact") -> Path:
    """The shipped teacher for a prompt set: ``world-teacher`` (trained on exact captions) or, for ``open``
    prompts, ``world-teacher-open`` (the same teacher fine-tuned on open captions too)."""
    return ASSETS / ("world-teacher-open" if prompts == "open" else "world-teacher")


#: The caption sets: exact (all five attributes named) and open (the shape and a subset of the rest).
CAPTION_SETS = ("exact", "open")
#: The attributes an open caption may leave out (the shape is the caption's noun, always named).
OPTIONAL = ("size", "colour", "position", "background")


@dataclass(frozen=True)
class ShapeSpec:
    """What an image shows. ``style`` is not part of the caption."""

    size: str
    colour: str
    shape: str
    position: str
    background: str
    style: str = "filled"

    def __post_init__(self):
        for name, values in (*ATTRIBUTES.items(), ("style", STYLES)):
            if getattr(self, name) not in values:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(values)}")

    def labels(self) -> dict[str, int]:
        """Class index of each attribute (and style), as the attribute classifier predicts them."""
        out = {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}
        out["style"] = STYLES.index(self.style)
        return out

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def caption(spec: ShapeSpec, named: tuple[str, ...] | None = None) -> str:
    """The exact caption format: ``a {size} {colour} {shape} in the {position} on a {background} background``.

    ``named``: the attributes to name (default all five). A leaf-out *open caption* drops the words of each
    attribute it does not name (the shape is the noun and is always named): ``a red circle``, ``a large circle
    on a black background``. Named in full it is the exact caption above.
    """
    if named is None:
        return f"a {spec.size} {spec.colour} {spec.shape} in the {spec.position} on a {spec.background} background"
    unknown = set(named) - set(ATTRIBUTES)
    if unknown or "shape" not in named:
        raise ValueError(f"an open caption names the shape and some of {', '.join(OPTIONAL)}; got {named!r}")
    words = ["a"] + [getattr(spec, a) for a in ("size", "colour") if a in named] + [spec.shape]
    if "position" in named:
        words += ["in", "the", spec.position]
    if "background" in named:
        words += ["on", "a", spec.background, "background"]
    return " ".join(words)


def parse_caption(text: str, style: str = "filled") -> ShapeSpec:
    """Inverse of :func:`caption`; raises ``ValueError`` on text that is not a world caption."""
    words = text.strip().split(" ")
    try:
        if words[0] != "a" or words[4] != "in" or words[5] != "the" or words[-1] != "background":
            raise IndexError
        size, colour, shape = words[1:4]
        rest = " ".join(words[6:-1])  # "{position} on a {background}"
        position, background = rest.split(" on a ")
        return ShapeSpec(size, colour, shape, position, background, style)
    except (IndexError, ValueError) as e:
        raise ValueError(f"not a world caption: {text!r}") from e


def parse_open_caption(text: str) -> dict[str, str]:
    """The attributes an open caption (or an exact one) names, ``{attribute: value}``; ``ValueError`` otherwise."""
    words = text.strip().split(" ")
    out: dict[str, str] = {}
    try:
        if words[0] != "a":
            raise ValueError
        i = 1
        for attr in ("size", "colour"):
            if words[i] in ATTRIBUTES[attr]:
                out[attr] = words[i]
                i += 1
        if words[i] not in SHAPES:
            raise ValueError
        out["shape"] = words[i]
        rest = " ".join(words[i + 1:])
        if rest.startswith("in the "):
            position, _, rest = rest[len("in the "):].partition(" on a ")
            rest = "on a " + rest if rest else ""
            if position not in POSITIONS:
                raise ValueError
            out["position"] = position
        if rest:
            if not (rest.startswith("on a ") and rest.endswith(" background")):
                raise ValueError
            background = rest[len("on a "):-len(" background")]
            if background not in BACKGROUNDS:
                raise ValueError
            out["background"] = background
    except (IndexError, ValueError) as e:
        raise ValueError(f"not a world caption: {text!r}") from e
    return out


def named_subsets() -> list[tuple[str, ...]]:
    """The 16 attribute sets an open caption can name (shape always), in a fixed order; the last one is all five."""
    subsets = []
    for mask in range(2 ** len(OPTIONAL)):
        chosen = {a for k, a in enumerate(OPTIONAL) if mask >> k & 1}
        subsets.append(tuple(a for a in ATTRIBUTES if a == "shape" or a in chosen))
    return subsets


def random_named(rng: np.random.Generator, p_named: float = 0.5) -> tuple[str, ...]:
    """An open caption's attribute set: each optional attribute named with probability ``p_named``."""
    draws = rng.random(len(OPTIONAL)) < p_named
    return tuple(a for a in ATTRIBUTES if a == "shape" or draws[OPTIONAL.index(a)])


def sample_named(seed: int, index: int) -> tuple[str, ...]:
    """The attribute set of image ``index``'s open caption in the set ``seed`` (training data and exports): depends
    only on (seed, index), like the image."""
    return random_named(np.random.default_rng([seed, index, 16]))


def all_specs(style: str = "filled") -> list[ShapeSpec]:
    """Every combination of the five attributes (540), in a fixed order."""
    return [ShapeSpec(*combo, style=style) for combo in itertools.product(*ATTRIBUTES.values())]


def all_prompts() -> list[str]:
    """The world's 540 captions."""
    return [caption(s) for s in all_specs()]


def eval_specs(n: int, seed: int = 0, style: str = "filled") -> list[ShapeSpec]:
    """``n`` specs spread evenly over the whole world: a seeded shuffle of the 540, repeated as needed."""
    specs = all_specs(style)
    order = np.random.default_rng(seed).permutation(len(specs))
    return [specs[order[i % len(specs)]] for i in range(n)]


def eval_named(n: int, seed: int = 0) -> list[tuple[str, ...]]:
    """The attribute sets of ``n`` open evaluation prompts (pair them with :func:`eval_specs`): the 16 sets in a
    seeded shuffle, repeated, drawn independently of the specs, so that the images the prompts describe are
    still uniform over the whole world (the same real set serves world-FID)."""
    subsets = named_subsets()
    order = np.random.default_rng([seed, 16]).permutation(len(subsets))
    return [subsets[order[i % len(subsets)]] for i in range(n)]


def random_spec(rng: np.random.Generator, style: str = "filled") -> ShapeSpec:
    return ShapeSpec(*(values[rng.integers(len(values))] for values in ATTRIBUTES.values()), style=style)


def _coverage(spec: ShapeSpec, extent: float, cx: float, cy: float, size: int = IMAGE_SIZE,
              supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (size, size) float in [0, 1], by ``supersample`` x supersampling."""
    n = size * supersample
    c = (np.arange(n) + 0.5) / supersample  # supersample centres in pixel coordinates
    x, y = np.meshgrid(c, c)  # x: column, y: row
    h = extent / 2.0
    if spec.shape == "circle":
        d = np.hypot(x - cx, y - cy)
        inside_depth = h - d  # distance to the boundary, positive inside
    elif spec.shape == "square":
        inside_depth = np.minimum(h - np.abs(x - cx), h - np.abs(y - cy))
    else:  # triangle: apex (cx, cy - h), base y = cy + h from cx - h to cx + h
        y_apex = cy - h
        to_base = (cy + h) - y
        # slanted edges satisfy 2|x - cx| = y - y_apex; unit normal (2, -1)/sqrt(5)
        to_sides = ((y - y_apex) - 2.0 * np.abs(x - cx)) / np.sqrt(5.0)
        inside_depth = np.minimum(to_base, to_sides)
    mask = inside_depth >= 0
    if spec.style == "outlined":
        mask &= inside_depth < STROKE
    # box filter: average each supersample x supersample block
    return mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(spec: ShapeSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw one image, (32, 32, 3) uint8. ``rng`` draws the +-1 px size and position jitter (none if None)."""
    jitter = rng.uniform(-JITTER, JITTER, size=3) if rng is not None else np.zeros(3)
    extent = SIZES[spec.size] + jitter[0]
    cx, cy = POSITIONS[spec.position]
    cov = _coverage(spec, extent, cx + jitter[1], cy + jitter[2])[..., None]
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.array(COLOURS[spec.colour], dtype=np.float64)
    return np.round(bg * (1.0 - cov) + fg * cov).astype(np.uint8)


def sample(n: int, seed: int = 0, style: str = "filled", start: int = 0) -> tuple[np.ndarray, list[ShapeSpec]]:
    """Images ``start .. start+n-1`` of the random set ``seed``: uniform attributes, jittered.

    Returns ``(images (n, 32, 32, 3) uint8, specs)``. Image ``i`` depends only on ``(seed, i)``.
    """
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    specs = []
    for j in range(n):
        rng = np.random.default_rng([seed, start + j])
        spec = random_spec(rng, style)
        images[j] = render(spec, rng)
        specs.append(spec)
    return images, specs
