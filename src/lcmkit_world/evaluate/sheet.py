"""Contact sheets: generated images with the judge's verdict drawn on each tile, for a person to check the judge.

A tile is the image enlarged (nearest neighbour) inside a frame: green when the strict verdict is right, red when it
is wrong, with a short reason in the corner of a wrong one (``A``: an attribute the prompt names is wrong; ``F``:
the shape is not well formed; ``AF``: both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lcmkit.atomic import atomic_write

RIGHT, WRONG = (40, 170, 60), (220, 40, 40)


def tile(image: np.ndarray, right: bool, reason: str = "", scale: int = 3, border: int = 3):
    """One framed tile (PIL image) of a uint8 (32, 32, 3) image."""
    from PIL import Image, ImageDraw

    inner = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    out = Image.new("RGB", (inner.width + 2 * border, inner.height + 2 * border), RIGHT if right else WRONG)
    out.paste(inner, (border, border))
    if not right and reason:
        draw = ImageDraw.Draw(out)
        draw.rectangle((0, 0, 7 * len(reason) + 3, 12), fill=WRONG)
        draw.text((2, 0), reason, fill=(255, 255, 255))
    return out


def reasons(judged: dict) -> list[str]:
    """Per image, the reason letters of a wrong verdict (see the module docstring); "" for a right one."""
    return [("" if a else "A") + ("" if f else "F") for a, f in zip(judged["attributes"], judged["well_formed"])]


def contact_sheet(images: np.ndarray, judged: dict, path: str | Path, title: str = "", cols: int = 8,
                  count: int = 64) -> Path:
    """The first ``count`` images with their verdicts (:func:`lcmkit_world.evaluate.metrics.judgements`) as a
    PNG grid of ``cols`` columns under a one-line ``title`` that gives the strict rate of all the images."""
    from PIL import Image, ImageDraw

    why = reasons(judged)
    n = min(count, len(images))
    tiles = [tile(images[i], bool(judged["strict"][i]), why[i]) for i in range(n)]
    w, h = tiles[0].size
    header = 16
    rows = -(-n // cols)
    sheet = Image.new("RGB", (cols * w, header + rows * h), "white")
    rate = float(np.mean(judged["strict"]))
    ImageDraw.Draw(sheet).text((4, 2), f"{title}  strict {rate:.3f} of {len(images)}; shown {n}", fill="black")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * w, header + (i // cols) * h))
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
