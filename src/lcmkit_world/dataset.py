"""The world as a generated training dataset: ``--data world[:filled|:outlined][:open]``.

Registered with lcmkit's recipes under the ``lcmkit.datasets`` entry point ``world`` (see ``pyproject.toml``).
Image i is rendered on the fly and depends only on (seed, i); ``:open`` captions name the shape and each of size,
colour, position and background with probability 1/2, drawn per sample from (seed, i).
"""

from __future__ import annotations

from lcmkit.errors import LcmkitError

from . import world


def parse_spec(data: str) -> tuple[str, bool]:
    """``(style, open captions)`` of ``world[:filled|:outlined][:open]`` (``world`` alone: filled, exact
    captions); anything else is an ``LcmkitError``."""
    parts = data.split(":")[1:]
    is_open = bool(parts) and parts[-1] == "open"
    styles = parts[:-1] if is_open else parts
    if len(styles) > 1 or any(p not in world.STYLES for p in styles):
        raise LcmkitError(f"unknown world style in {data!r}; use world, world:filled or world:outlined, "
                          "optionally followed by :open (open captions)")
    return (styles[0] if styles else "filled"), is_open


class WorldDataset:
    """``size`` world images of ``seed`` in the style and caption set ``spec`` names (:func:`parse_spec`)."""

    def __init__(self, spec: str, size: int, seed: int):
        self.style, self.open = parse_spec(spec)
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def load(self, i: int):
        from PIL import Image

        images, specs = world.sample(1, seed=self.seed, style=self.style, start=i)
        named = world.sample_named(self.seed, i) if self.open else None
        return Image.fromarray(images[0]), world.caption(specs[0], named)

    def captions(self) -> list[str]:
        if self.open:
            return [world.caption(s, n) for s in world.all_specs() for n in world.named_subsets()]
        return world.all_prompts()
