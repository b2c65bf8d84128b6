"""LoRA files read once per process (lcmkit.lora_cache): a second use of a file reads, converts and checks nothing and
fuses the same weights bit for bit; a file changed on disk (in place, even with its mtime set back, or replaced) is
read again; different files, λ and model layouts never share a result; the cache is bounded; the model is restored
bit for bit after every one of repeated calls."""

from __future__ import annotations

import copy
import os
import time

import pytest
import tiny
import torch
from test_lora_formats import random_lora
from test_task_arithmetic import changed, rel_diff, snapshot, unet_out

import lcmkit.task_arithmetic as ta
from lcmkit.errors import LcmkitError
from lcmkit.lora_cache import LORA_CACHE, RACY_SECONDS, LoraCache, layout_key
from lcmkit.lora_formats import pipeline_models, save_lora
from lcmkit.pipelines import generate
from lcmkit.task_arithmetic import apply_loras, load_lora_specs, merge_loras


@pytest.fixture(scope="module")
def sd():
    return tiny.tiny_sd()


@pytest.fixture(scope="module")
def two_loras(sd):
    models = pipeline_models(sd)
    return random_lora(models, seed=20), random_lora(models, seed=21)


@pytest.fixture(autouse=True)
def empty_cache():
    LORA_CACHE.clear()
    yield
    LORA_CACHE.clear()


@pytest.fixture
def reads(monkeypatch):
    """How many times a LoRA file was read and converted."""
    count = []
    real = ta.read_safetensors
    monkeypatch.setattr(ta, "read_safetensors", lambda *a, **k: count.append(1) or real(*a, **k))
    return count


def settled(path, seconds: float = 60.0):
    """Set the file's mtime ``seconds`` back: older than the racily-clean window, so the cache may keep it."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def fused_weights(pipe, loras) -> dict[str, torch.Tensor]:
    """The UNet and text-encoder parameters while ``loras`` are fused by apply_loras; restored after."""
    with apply_loras(pipe, loras, fuse=True):
        return snapshot(pipeline_models(pipe))


def merged_weights(pipe, weights_and_lams) -> dict[str, torch.Tensor]:
    return snapshot(merge_loras(pipeline_models(pipe), weights_and_lams))


def test_a_second_use_reads_nothing_and_fuses_the_same_weights_bit_for_bit(sd, two_loras, tmp_path, reads):
    models = pipeline_models(sd)
    path = settled(save_lora(two_loras[0], tmp_path / "a.safetensors", fmt="kohya"))
    before = snapshot(models)
    base = unet_out(sd.unet, sd.text_encoder)
    expect = {lam: merged_weights(sd, [(two_loras[0], lam)]) for lam in (1.0, 0.5)}
    for i, (lam, fuse) in enumerate([(1.0, True), (0.5, True), (1.0, False), (1.0, True), (0.5, True)]):
        with apply_loras(sd, [(path, lam)], fuse=fuse):
            if fuse:  # the cached weights, λ applied per call: merge_loras' weights exactly
                now = snapshot(models)
                assert all(torch.equal(now[k], v) for k, v in expect[lam].items()), (i, lam)
            else:
                hooked = unet_out(sd.unet, sd.text_encoder)
        assert changed(models, before) == [], i  # restored bit for bit after every call
    assert len(reads) == 1 and len(LORA_CACHE) == 1 and LORA_CACHE.hits == 4
    with apply_loras(sd, [(path, 1.0)], fuse=True):
        assert rel_diff(unet_out(sd.unet, sd.text_encoder), hooked) <= 1e-5
    assert torch.equal(unet_out(sd.unet, sd.text_encoder), base)
    with pytest.raises(LcmkitError, match="weight of LoRA .* is nan"):  # λ is checked on every call, cached or not
        load_lora_specs(models, [(path, float("nan"))])


def test_repeated_generate_calls_give_the_same_images_and_restore_every_time(tiny_sd_pipe, tmp_path, reads):
    lora = settled(tiny.tiny_lora_file(tiny_sd_pipe.unet, tmp_path / "l.safetensors", seed=3))
    models = pipeline_models(tiny_sd_pipe)
    before = snapshot(models)
    run = lambda **kw: generate(tiny_sd_pipe, "a red circle", steps=2, height=64, width=64,  # noqa: E731
                                progress=False, output_type="np", **kw)
    first = run(loras=[lora])
    for _ in range(3):
        assert (run(loras=[lora]) == first).all()
        assert changed(models, before) == []
    assert len(reads) == 1
    LORA_CACHE.clear()
    assert (run(loras=[lora]) == first).all() and len(reads) == 2  # read afresh: the same image
    assert abs(run() - first).max() > 1e-3 and changed(models, before) == []


def test_a_file_changed_on_disk_is_read_again(sd, two_loras, tmp_path, reads):
    path = settled(save_lora(two_loras[0], tmp_path / "a.safetensors", fmt="kohya"))
    other = save_lora(two_loras[1], tmp_path / "b.safetensors", fmt="kohya")
    assert path.stat().st_size == other.stat().st_size  # the same layout: only the values differ
    kept = load_lora_specs(pipeline_models(sd), [path])[0][0]
    snapshot_of_kept = {k: v.down.clone() for k, v in kept.items()}
    a, b = fused_weights(sd, [(path, 1.0)]), merged_weights(sd, [(two_loras[1], 1.0)])
    assert len(reads) == 1

    # rewritten in place, same size, mtime set back to what it was: only the ctime tells
    old = path.stat()
    time.sleep(0.05)
    with open(path, "r+b") as f:
        f.write(other.read_bytes())
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    now = fused_weights(sd, [(path, 1.0)])
    assert len(reads) == 2 and all(torch.equal(now[k], v) for k, v in b.items())
    # the kept tensors were copied out of the file's memory map: the rewrite did not reach them
    assert all(torch.equal(v.down, snapshot_of_kept[k]) for k, v in kept.items())

    # a file written moments ago is racily clean: read every time until it is older than the window
    assert time.time() - path.stat().st_mtime > RACY_SECONDS  # (set back above)
    path.write_bytes(path.read_bytes())
    fused_weights(sd, [(path, 1.0)])
    fused_weights(sd, [(path, 1.0)])
    assert len(reads) == 4

    # replaced by a rename over it (a new inode), as atomic writers do
    settled(path)
    fused_weights(sd, [(path, 1.0)])
    replacement = save_lora(two_loras[0], tmp_path / "c.safetensors", fmt="kohya")
    settled(replacement, 120)
    os.replace(replacement, path)
    now = fused_weights(sd, [(path, 1.0)])
    assert len(reads) == 6 and all(torch.equal(now[k], v) for k, v in a.items())

    # a cached file turned into a pickle or removed is refused as ever
    path.write_bytes(b"\x80\x04" + b"\0" * 64)
    with pytest.raises(LcmkitError, match="pickle"):
        apply_loras(sd, [(path, 1.0)], fuse=True)
    path.unlink()
    with pytest.raises(LcmkitError, match="not found"):
        apply_loras(sd, [(path, 1.0)], fuse=True)


def test_files_lambdas_and_layouts_do_not_share_an_entry(sd, two_loras, tmp_path, reads):
    models = pipeline_models(sd)
    a = settled(save_lora(two_loras[0], tmp_path / "a.safetensors", fmt="kohya"))
    b = settled(save_lora(two_loras[1], tmp_path / "b.safetensors", fmt="peft"))
    for _ in range(2):
        for path, weights in ((a, two_loras[0]), (b, two_loras[1])):
            now, expect = fused_weights(sd, [(path, 0.7)]), merged_weights(sd, [(weights, 0.7)])
            assert all(torch.equal(now[k], v) for k, v in expect.items())
    both = fused_weights(sd, [(a, 0.3), (b, 1.0)])
    expect = merged_weights(sd, [(two_loras[0], 0.3), (two_loras[1], 1.0)])
    assert all(torch.equal(both[k], v) for k, v in expect.items())
    assert len(reads) == 2 and len(LORA_CACHE) == 2

    # the same pipeline copied: the same layout shares the entry; one more module: a new layout, read again
    twin = copy.deepcopy(sd)
    assert layout_key(pipeline_models(twin)) == layout_key(models)
    fused_weights(twin, [(a, 1.0)])
    assert len(reads) == 2
    twin.unet.add_module("extra", torch.nn.Linear(2, 2))
    assert layout_key(pipeline_models(twin)) != layout_key(models)
    fused_weights(twin, [(a, 1.0)])
    assert len(reads) == 3 and len(LORA_CACHE) == 3


def test_the_cache_is_bounded_in_entries_and_bytes(sd, two_loras, tmp_path):
    models = pipeline_models(sd)
    cache = LoraCache(max_entries=2)
    paths = [settled(save_lora(two_loras[i % 2], tmp_path / f"{i}.safetensors", fmt="kohya")) for i in range(3)]
    read = lambda p: ta.read_checked(p, models)  # noqa: E731
    for p in paths[:2]:
        cache.get_or_read(p, models, read)
    cache.get_or_read(paths[0], models, read)  # used last: paths[1] is now the least recently used
    cache.get_or_read(paths[2], models, read)
    assert len(cache) == 2 and cache.misses == 3 and cache.hits == 1
    cache.get_or_read(paths[0], models, read)
    assert cache.hits == 2
    cache.get_or_read(paths[1], models, read)
    assert cache.misses == 4  # it had been evicted
    entry_bytes = cache.nbytes // 2
    small = LoraCache(max_bytes=entry_bytes - 1)  # one file is more than it may hold: never kept
    small.get_or_read(paths[0], models, read)
    assert len(small) == 0
