"""The shipped world evaluator and the metrics built on it (lcmkit_world.evaluate)."""

import json

import numpy as np
import pytest
import torch

from lcmkit.errors import LcmkitError
from lcmkit_world import world
from lcmkit_world.evaluate import metrics
from lcmkit_world.evaluate.classifier import (
    ASSET_DIR,
    HEADS,
    WorldClassifier,
    as_model_input,
    load_classifier,
    measure_accuracy,
    save_classifier,
)

FRESH_SEED = 424_242  # neither the training seed (0) nor the seed stored in config.json (10000)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return metrics.load_evaluator()


def noise_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_shipped_files_are_small_and_safetensors_only():
    names = sorted(p.name for p in ASSET_DIR.iterdir())
    assert names == ["config.json", "judge.json", "model.safetensors"]  # judge.json: the strict judge's thresholds
    assert sum(p.stat().st_size for p in ASSET_DIR.iterdir()) < 3 * 2**20
    cfg = json.loads((ASSET_DIR / "config.json").read_text())
    assert cfg["classes"] == {k: list(v) for k, v in HEADS.items()}
    assert 128 <= cfg["feature_dim"] <= 256
    assert metrics.load_evaluator() is metrics.load_evaluator()  # cached


def test_accuracy_on_fresh_real_images(model):
    acc = measure_accuracy(model, 500, FRESH_SEED)  # 250 filled + 250 outlined
    assert set(acc) == set(HEADS)
    assert min(acc.values()) >= 0.99, acc


def test_prompt_scores_real_and_noise(model):
    images, specs = world.sample(200, seed=FRESH_SEED + 1, style="outlined")
    s = metrics.prompt_scores(images, specs, model)
    assert s["prompt"] >= 0.97 and s["style_rate"] >= 0.97 and s["style_accuracy"] == s["style_rate"]
    float_nchw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert metrics.prompt_scores(float_nchw, specs, model) == s  # the same images as [-1, 1] floats
    specs = world.eval_specs(300, seed=1)
    noise = metrics.prompt_scores(noise_images(300, 0), specs, model)
    assert noise["prompt"] < 0.05, noise
    assert metrics.prompt_scores(noise_images(300, 0), specs, model) == noise  # repeatable
    with pytest.raises(LcmkitError, match="specs"):
        metrics.prompt_scores(images[:3], specs[:2], model)


def test_world_fid_real_vs_noise(model):
    n = 500  # small sets keep the test fast; the floor and world_fid share the cached reference statistics
    real, _ = world.sample(n, seed=FRESH_SEED + 2)
    fid_real = metrics.world_fid(real, n_real=n, model=model)
    fid_noise = metrics.world_fid(noise_images(n, 1), n_real=n, model=model)
    assert fid_real == metrics.world_fid(real, n_real=n, model=model)  # repeatable
    assert fid_noise > 20 * fid_real, (fid_real, fid_noise)
    floor = metrics.fid_floor(n, model=model)
    assert floor < 3 * fid_real + 1.0 and floor == metrics.fid_floor(n, model=model)


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 5))
    mu, sigma = metrics.gaussian_stats(f)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # 1-D: N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * 2 = 2
    assert metrics.frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0)
    # a singular covariance (rank-deficient) still gives a finite real number
    g = np.concatenate([f[:, :2], f[:, :2]], axis=1)
    assert np.isfinite(metrics.frechet_distance(*metrics.gaussian_stats(g), *metrics.gaussian_stats(g + 0.1)))


def test_trajectory_error():
    a = np.zeros((3, 32, 32, 3), np.uint8)
    b = np.full((3, 32, 32, 3), 255, np.uint8)
    assert metrics.trajectory_error(a, a) == 0.0
    assert metrics.trajectory_error(a, b) == pytest.approx(2.0)  # -1 vs +1 everywhere
    c = torch.zeros(3, 3, 32, 32)
    c[0] = 1.0  # one image off by 1 everywhere, two off by 1 (uint8 0 -> -1)
    assert metrics.trajectory_error(a, c) == pytest.approx((2.0 + 1.0 + 1.0) / 3)
    with pytest.raises(LcmkitError, match="shape"):
        metrics.trajectory_error(a, b[:2])


def test_save_load_round_trip(tmp_path, model):
    save_classifier(model, tmp_path)
    again = load_classifier(tmp_path)
    x = as_model_input(world.sample(8, seed=3)[0])
    with torch.no_grad():
        assert torch.equal(model.features(x), again.features(x))
    assert isinstance(again, WorldClassifier) and not again.training
    with pytest.raises(LcmkitError, match="no world evaluator"):
        load_classifier(tmp_path / "missing")


def test_prompt_scores_count_only_the_named_attributes(model):
    images, specs = world.sample(120, seed=FRESH_SEED + 2)
    # prompts that name only the shape and colour, scored against specs whose background is wrong: still right
    other_bg = [world.ShapeSpec(s.size, s.colour, s.shape, s.position,
                                world.ATTRIBUTES["background"][(world.ATTRIBUTES["background"].index(s.background) + 1)
                                                               % 3]) for s in specs]
    loose = [("colour", "shape")] * len(specs)
    s = metrics.prompt_scores(images, other_bg, model, named=loose)
    assert s["prompt"] >= 0.97 and np.isnan(s["background"]) and s["colour"] >= 0.97
    assert metrics.prompt_scores(images, other_bg, model)["prompt"] < 0.05  # named in full: every image is wrong
    strict = [("shape", "background")] * len(specs)
    assert metrics.prompt_scores(images, other_bg, model, named=strict)["prompt"] < 0.05
    with pytest.raises(LcmkitError, match="attribute sets"):
        metrics.prompt_scores(images, specs, model, named=loose[:3])
