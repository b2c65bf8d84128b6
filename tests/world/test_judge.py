"""The strict judge: hard negatives, the geometric fit, the strict verdict, world-FID that moves, contact sheets."""

from __future__ import annotations

import numpy as np
import pytest

from lcmkit_world import distort, world
from lcmkit_world.evaluate import geometry, metrics, sheet


def _colours(specs):
    return (np.array([world.BACKGROUNDS[s.background] for s in specs]),
            np.array([world.COLOURS[s.colour] for s in specs]))


def test_hard_negatives_are_deterministic_and_malformed():
    for kind, shapes in distort.KINDS.items():
        a, specs = distort.sample(kind, 6, seed=3)
        b, _ = distort.sample(kind, 6, seed=3)
        assert a.dtype == np.uint8 and a.shape == (6, 32, 32, 3) and np.array_equal(a, b), kind
        assert all(s.shape in shapes for s in specs), kind
        clean = np.stack([world.render(s) for s in specs])
        moved = np.abs(geometry.coverage(a, *_colours(specs)) - geometry.coverage(clean, *_colours(specs)))
        assert (moved.sum(axis=(1, 2)) > 4).all(), kind  # more than 4 pixels' worth of shape differ from the clean one


@pytest.mark.parametrize("shape", world.SHAPES)
def test_the_fit_recovers_a_clean_shape(shape):
    spec = world.ShapeSpec("large", "red", shape, "center", "black")
    image = world.render(spec)[None]  # extent 18 at (16, 16)
    fitted = geometry.judge(image, *_colours([spec]), "filled")
    s = world.SHAPES.index(shape)
    assert fitted["iou"][0, s] > 0.95 and fitted["iou"][0].argmax() == s
    assert abs(fitted["extent"][0, s] - 18.0) <= 0.5
    assert abs(fitted["cx"][0, s] - 16.0) <= 0.5 and abs(fitted["cy"][0, s] - 16.0) <= 0.5


def test_well_formed_accepts_clean_renders_and_rejects_every_kind():
    for style in world.STYLES:
        images, specs = world.sample(60, seed=901, style=style)
        fitted = geometry.judge(images, *_colours(specs), style)
        shape = np.array([world.SHAPES.index(s.shape) for s in specs])
        assert geometry.well_formed(fitted, shape).mean() >= 0.98, style
        for kind in distort.KINDS:
            x, kspecs = distort.sample(kind, 20, seed=902, style=style)
            fitted = geometry.judge(x, *_colours(kspecs), style)
            kshape = np.array([world.SHAPES.index(s.shape) for s in kspecs])
            assert geometry.well_formed(fitted, kshape).mean() <= 0.1, (kind, style)


def test_strict_verdict_is_attributes_and_form():
    clean, specs = world.sample(30, seed=903)
    bad, bad_specs = distort.sample("diamond", 30, seed=903)
    images, all_specs = np.concatenate([clean, bad]), specs + bad_specs
    j = metrics.judgements(images, all_specs)
    assert np.array_equal(j["strict"], j["attributes"] & j["well_formed"])
    assert j["strict"][:30].mean() >= 0.95 and j["strict"][30:].mean() <= 0.1
    # the classifier alone calls most diamonds circles: the form check is what rejects them
    assert j["attributes"][30:].mean() > j["strict"][30:].mean()
    scores = metrics.prompt_scores(images, all_specs, judged=j)
    assert scores["prompt"] == pytest.approx(j["strict"].mean())
    assert scores["attributes"] == pytest.approx(j["attributes"].mean())


def test_world_fid_moves_when_shapes_distort():
    n = 300
    floor = metrics.fid_floor(n)
    pinched, specs = distort.sample("pinched", n, seed=904)
    assert metrics.world_fid(pinched, n_real=n) > 10 * floor


def test_contact_sheet_draws_a_verdict_on_each_tile(tmp_path):
    images, specs = world.sample(10, seed=905)
    j = metrics.judgements(images, specs)
    j["strict"][3] = False
    j["well_formed"][3] = False
    path = sheet.contact_sheet(images, j, tmp_path / "s.png", title="t", cols=5)
    from PIL import Image

    im = np.asarray(Image.open(path))
    w = 32 * 3 + 6
    assert im.shape == (16 + 2 * w, 5 * w, 3)
    assert tuple(im[16 + 1, 3 * w + w // 2]) == sheet.WRONG and tuple(im[16 + 1, w // 2]) == sheet.RIGHT
