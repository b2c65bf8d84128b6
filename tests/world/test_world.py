"""The shapes world renderer measured from its pixels against the spec (lcmkit_world.world)."""

import numpy as np
import pytest

from lcmkit_world import world

COLOURS = list(world.COLOURS)


def coverage(image: np.ndarray, spec: world.ShapeSpec) -> np.ndarray:
    """Per-pixel object coverage in [0, 1], inverted from the bg/fg blend on the channel where they differ most."""
    bg = np.array(world.BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.array(world.COLOURS[spec.colour], dtype=np.float64)
    c = int(np.argmax(np.abs(fg - bg)))
    return np.clip((image[..., c].astype(np.float64) - bg[c]) / (fg[c] - bg[c]), 0.0, 1.0)


def extent(cov: np.ndarray, axis: int) -> float:
    """Sub-pixel extent along ``axis`` (1: x, 0: y): the summed profile of maximum coverage."""
    return float(cov.max(axis=axis).sum())


def bbox_centre(cov: np.ndarray) -> tuple[float, float]:
    """Centre (x, y) of the bounding box of pixels at least half covered, in continuous pixel coordinates."""
    rows, cols = np.nonzero(cov >= 0.5)
    return (cols.min() + cols.max() + 1) / 2.0, (rows.min() + rows.max() + 1) / 2.0


def jittered(spec: world.ShapeSpec, seed: int) -> np.ndarray:
    return world.render(spec, np.random.default_rng(seed))


@pytest.mark.parametrize("background", list(world.BACKGROUNDS))
def test_background_at_corners(background):
    for position in world.POSITIONS:
        img = jittered(world.ShapeSpec("large", "red", "square", position, background), 0)
        # a large square may touch the corner it sits in, never the opposite one; centred, none
        far = {"center": [(0, 0), (0, 31), (31, 0), (31, 31)], "top left": [(31, 31)], "top right": [(31, 0)],
               "bottom left": [(0, 31)], "bottom right": [(0, 0)]}[position]
        for i, j in far:
            assert tuple(img[i, j]) == world.BACKGROUNDS[background]


@pytest.mark.parametrize("colour", COLOURS)
def test_object_colour_at_centre_of_filled_shape(colour):
    for shape in world.SHAPES:
        for size in world.SIZES:
            spec = world.ShapeSpec(size, colour, shape, "center", "gray")
            img = jittered(spec, 1)
            cy = 17 if shape == "triangle" else 16  # a triangle's widest part is below its centre
            assert tuple(img[cy, 16]) == world.COLOURS[colour], (size, shape)


@pytest.mark.parametrize("position", list(world.POSITIONS))
def test_position_from_pixels(position):
    px, py = world.POSITIONS[position]
    for shape in world.SHAPES:
        for size in world.SIZES:
            for seed in range(3):
                spec = world.ShapeSpec(size, "blue", shape, position, "white")
                x, y = bbox_centre(coverage(jittered(spec, seed), spec))
                assert abs(x - px) <= 1.5 and abs(y - py) <= 1.5, (shape, size, seed, x, y)
                if shape != "triangle":  # the area centroid of a triangle sits below its box centre
                    cov = coverage(jittered(spec, seed), spec)
                    rows, cols = np.indices(cov.shape) + 0.5
                    cx, cy = (cov * cols).sum() / cov.sum(), (cov * rows).sum() / cov.sum()
                    assert abs(cx - px) <= 1.5 and abs(cy - py) <= 1.5


@pytest.mark.parametrize("size", list(world.SIZES))
def test_extent_matches_size(size):
    for shape in world.SHAPES:
        for seed in range(3):
            spec = world.ShapeSpec(size, "green", shape, "center", "black")
            cov = coverage(jittered(spec, seed), spec)
            for axis in (0, 1):
                assert abs(extent(cov, axis) - world.SIZES[size]) <= 1.5, (shape, seed, axis, extent(cov, axis))


def test_triangle_apex_up():
    for size in world.SIZES:
        for position in world.POSITIONS:
            spec = world.ShapeSpec(size, "yellow", "triangle", position, "black")
            cov = coverage(world.render(spec), spec)
            cy = int(world.POSITIONS[position][1])
            assert cov[cy:].sum() > 1.5 * cov[:cy].sum()


def test_outlined_shows_background_at_centre():
    for shape in world.SHAPES:
        for bg in world.BACKGROUNDS:
            spec = world.ShapeSpec("large", "purple", shape, "center", bg, style="outlined")
            img = jittered(spec, 2)
            assert tuple(img[16, 16]) == world.BACKGROUNDS[bg], shape
            filled = world.render(world.ShapeSpec("large", "purple", shape, "center", bg))
            assert coverage(img, spec).sum() < 0.8 * coverage(filled, spec).sum()


def test_captions_distinct_and_round_trip():
    prompts = world.all_prompts()
    assert len(prompts) == 540 and len(set(prompts)) == 540
    for spec in world.all_specs():
        assert world.parse_caption(world.caption(spec)) == spec
    with pytest.raises(ValueError):
        world.parse_caption("a large red circle on a black background")


def test_sample_is_deterministic_and_index_addressed():
    a, specs_a = world.sample(12, seed=5)
    b, specs_b = world.sample(12, seed=5)
    assert np.array_equal(a, b) and specs_a == specs_b
    part, specs_part = world.sample(4, seed=5, start=8)
    assert np.array_equal(part, a[8:]) and specs_part == specs_a[8:]
    c, _ = world.sample(12, seed=6)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == (12, 32, 32, 3)


def test_open_captions_name_what_they_say_and_round_trip():
    subsets = world.named_subsets()
    assert len(set(subsets)) == 16 and all("shape" in n for n in subsets)
    assert subsets[-1] == tuple(world.ATTRIBUTES)
    captions = set()
    for spec in world.all_specs():
        assert world.caption(spec, subsets[-1]) == world.caption(spec)  # named in full: the exact caption
        for named in subsets:
            text = world.caption(spec, named)
            assert world.parse_open_caption(text) == {a: getattr(spec, a) for a in named}
            captions.add(text)
    # 540 specs x 16 subsets, but a caption that leaves attributes out is shared by the specs that differ there
    expected = sum(3 * np.prod([len(world.ATTRIBUTES[a]) for a in n if a != "shape"]) for n in subsets)
    assert len(captions) == expected
    assert world.caption(world.ShapeSpec("small", "red", "circle", "center", "black"), ("colour", "shape")) \
        == "a red circle"
    for bad in ("a red", "a red circle in the middle", "a circle on a pink background", "the red circle",
                "a red circle on a black"):
        with pytest.raises(ValueError):
            world.parse_open_caption(bad)
    with pytest.raises(ValueError, match="shape"):
        world.caption(world.all_specs()[0], ("colour",))


def test_open_eval_prompts_cover_the_subsets_evenly_and_random_named_is_fair():
    named = world.eval_named(160, seed=3)
    assert {n: named.count(n) for n in world.named_subsets()} == {n: 10 for n in world.named_subsets()}
    assert named == world.eval_named(160, seed=3) and named != world.eval_named(160, seed=4)
    rng = np.random.default_rng(0)
    draws = [world.random_named(rng) for _ in range(4000)]
    for attr in world.OPTIONAL:
        assert abs(np.mean([attr in n for n in draws]) - 0.5) < 0.03
    assert all("shape" in n for n in draws)
