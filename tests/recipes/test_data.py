"""Export the world and read it back (imagefolder, webdataset); bad data is skipped and counted, never fatal."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcmkit.data.datasets import (
    ImageTransform,
    expand_braces,
    load_dataset,
    resolve_shards,
)
from lcmkit.errors import LcmkitError
from lcmkit_world import world
from lcmkit_world.export import export_world


def read_all(ds):
    """Every usable (image as uint8 array, caption) of one pass in stored order."""
    return [(np.asarray(img), cap) for img, cap in ds.iterate()]


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    img.save(buf, format="PNG")
    return buf.getvalue()


def tar_shard(path: Path, files: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# --- round trips -------------------------------------------------------------------------------------------
def test_imagefolder_round_trip(tmp_path):
    out = export_world(tmp_path / "if", 20, style="outlined", seed=7)
    images, specs = world.sample(20, seed=7, style="outlined")
    got = read_all(load_dataset(out))
    assert [c for _, c in got] == [world.caption(s) for s in specs]
    assert all(np.array_equal(a, b) for (a, _), b in zip(got, images))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows[3]["file_name"] == "000003.png" and rows[3]["attributes"] == specs[3].to_dict()


def test_webdataset_round_trip_and_patterns(tmp_path):
    out = export_world(tmp_path / "wd", 25, fmt="webdataset", seed=3, shard_size=10)
    assert sorted(p.name for p in out.iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    with tarfile.open(out / "shard-000000.tar") as tf:
        assert tf.getnames()[:4] == ["000000.png", "000000.txt", "000001.png", "000001.txt"]
    images, specs = world.sample(25, seed=3)
    for spec in (out, out / "shard-{000000..000002}.tar", str(out / "*.tar"),
                 [out / "shard-000000.tar", str(out / "shard-{000001,000002}.tar")]):
        got = read_all(load_dataset(spec))
        assert [c for _, c in got] == [world.caption(s) for s in specs], spec
        assert all(np.array_equal(a, b) for (a, _), b in zip(got, images))
    assert len(load_dataset(out / "shard-{000001..000002}.tar")) == 15
    with pytest.raises(LcmkitError, match="does not exist"):
        resolve_shards(str(out / "shard-{000000..000005}.tar"))


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_open_caption_export_matches_the_world_data_source(fmt, tmp_path):
    out = export_world(tmp_path / fmt, 40, fmt=fmt, seed=5, captions="open", style="outlined")
    images, specs = world.sample(40, seed=5, style="outlined")
    got = read_all(load_dataset(out))
    assert [c for _, c in got] == [world.caption(s, world.sample_named(5, i)) for i, s in enumerate(specs)]
    assert all(np.array_equal(a, b) for (a, _), b in zip(got, images))
    assert sum(len(world.parse_open_caption(c)) < 5 for _, c in got) > 20
    with pytest.raises(LcmkitError, match="unknown captions"):
        export_world(tmp_path / "bad", 4, captions="vague")


def test_export_is_deterministic_and_refuses_non_empty(tmp_path):
    a = export_world(tmp_path / "a", 12, fmt="webdataset", seed=1, shard_size=5)
    b = export_world(tmp_path / "b", 12, fmt="webdataset", seed=1, shard_size=5)
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in ("shard-000000.tar", "shard-000002.tar"))
    with pytest.raises(LcmkitError, match="not empty"):
        export_world(a, 4, fmt="webdataset", seed=1)
    (a / "notes.md").write_text("keep me")
    export_world(a, 4, fmt="webdataset", seed=1, shard_size=5, overwrite=True)
    assert sorted(p.name for p in a.iterdir()) == ["notes.md", "shard-000000.tar"]  # stale shards gone
    with pytest.raises(LcmkitError, match="unknown format"):
        export_world(tmp_path / "c", 4, fmt="zip")


def test_cli_export(tmp_path, capsys):
    from lcmkit.cli import main

    assert main(["world", "export", "--out", str(tmp_path / "x"), "--n", "6", "--format", "webdataset"]) == 0
    assert len(load_dataset(tmp_path / "x")) == 6
    assert main(["world", "export", "--out", str(tmp_path / "x"), "--n", "6"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_expand_braces():
    assert expand_braces("s-{000008..000010}.tar") == ["s-000008.tar", "s-000009.tar", "s-000010.tar"]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{0..4..2}") == ["x0", "x2", "x4"]
    assert expand_braces("{a,b{c,d}}") == ["a", "bc", "bd"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("lit{x}") == ["lit{x}"]
    with pytest.raises(LcmkitError, match="unbalanced"):
        expand_braces("s-{0..3.tar")


# --- transforms, shuffling, resume -------------------------------------------------------------------------
def test_transform_resize_crop_and_no_flip_by_default(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255  # left half white
    root = tmp_path / "f"
    root.mkdir()
    (root / "a.png").write_bytes(png(arr))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "left white"}) + "\n")
    ds = load_dataset(root, ImageTransform(20))
    for seed in range(5):
        (x, _), = list(ds.iterate(torch.Generator().manual_seed(seed)))
        assert x.shape == (3, 20, 20) and x.dtype == torch.float32
        assert x[:, :, :9].min() > 0.9 and x[:, :, 11:].max() < -0.9  # centre crop of the 20x40 resize
    assert ImageTransform().flip is False
    flips = set()
    ds_f = load_dataset(root, ImageTransform(20, flip=True))
    for seed in range(8):
        (x, _), = list(ds_f.iterate(torch.Generator().manual_seed(seed)))
        flips.add(bool(x[0, 0, 0] > 0))
    assert flips == {True, False}


def test_seeded_shuffle_and_exact_resume(tmp_path):
    export_world(tmp_path / "d", 30, fmt="webdataset", seed=2, shard_size=7)
    ds = load_dataset(tmp_path / "d", ImageTransform(24, crop="random"))
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    full = list(ds.iterate(gen(11)))
    again = list(ds.iterate(gen(11)))
    other = list(ds.iterate(gen(12)))
    assert [c for _, c in full] == [c for _, c in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full, again))
    assert [c for _, c in full] != [c for _, c in other]
    it = ds.iterate(gen(11), skip=13)
    resumed = list(it)
    assert it.position == 30 and len(resumed) == 17
    assert all(torch.equal(a, b) and ca == cb for (a, ca), (b, cb) in zip(resumed, full[13:]))
    assert torch.get_rng_state().equal(torch.get_rng_state())  # smoke: nothing above needs the global RNG


def test_batches_and_dataset_smaller_than_a_batch(tmp_path):
    export_world(tmp_path / "d", 10, seed=0)
    ds = load_dataset(tmp_path / "d", ImageTransform(32))
    batches = list(ds.batches(4, torch.Generator().manual_seed(0)))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 32, 32) and len(batches[0][1]) == 4
    with pytest.raises(LcmkitError, match="fewer than one batch"):
        next(ds.batches(16))


# --- bad data ----------------------------------------------------------------------------------------------
def _good(i: int) -> np.ndarray:
    return world.sample(1, seed=0, start=i)[0][0]


def make_bad_imagefolder(root: Path, n_good: int) -> Path:
    root.mkdir()
    rows = []
    for i in range(n_good):
        (root / f"g{i}.png").write_bytes(png(_good(i)))
        rows.append({"file_name": f"g{i}.png", "text": f"good {i}"})
    ok = png(_good(0))
    files = {
        "corrupt.png": b"not an image at all",
        "truncated.png": ok[: len(ok) // 2],
        "small.png": png(np.zeros((8, 8, 3), np.uint8)),
        "grey.png": png(_good(1), "L"),
        "rgba.png": png(_good(2), "RGBA"),
        "palette.png": png(_good(3), "P"),
        "nocap.png": ok,
        "emptycap.png": ok,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        rows.append({"file_name": name, "text": "bad" if name != "emptycap.png" else "   "})
    rows[-2].pop("text")  # nocap.png
    rows.append({"file_name": "missing.png", "text": "gone"})
    (root.parent / "secret.png").write_bytes(ok)  # outside the dataset: must never be read
    rows.append({"file_name": "../secret.png", "text": "escape"})
    rows.append({"file_name": str(root.parent / "secret.png"), "text": "absolute"})
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"text": "no file name"})]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_bad_imagefolder_skipped_and_counted(tmp_path):
    ds = load_dataset(make_bad_imagefolder(tmp_path / "bad", 90), ImageTransform(32), max_bad_fraction=0.2)
    got = list(ds.iterate())
    assert len(got) == 90 + 3  # grey, rgba and palette are converted, not skipped
    assert all(x.shape == (3, 32, 32) for x, _ in got)
    assert ds.skipped == Counter(corrupt_image=2, too_small=1, missing_caption=1, empty_caption=1,
                                 missing_image=1, bad_metadata=2, path_outside_dataset=2)
    assert ds.converted == Counter(L=1, RGBA=1, P=1)
    assert ds.bad == 10 and ds.seen == 103


def test_bad_webdataset_skipped_and_counted(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    good = [(f"{i:04d}.png", png(_good(i))) for i in range(40)] + [(f"{i:04d}.txt", b"a caption") for i in range(40)]
    tar_shard(d / "a-0.tar", good)
    tar_shard(d / "a-1.tar", [])  # a valid tar with no members
    (d / "a-2.tar").write_bytes(b"")  # zero bytes
    tar_shard(d / "a-3.tar", [("x.png", b"garbage"), ("x.txt", b"c"), ("y.png", png(_good(5))),
                              ("z.png", png(_good(6))), ("z.txt", b"  \n"), ("w.txt", b"orphan caption"),
                              ("u.png", png(_good(7))), ("u.txt", b"\xff\xfe bad utf8")])
    members = [(f"t{i}.{ext}", png(_good(i)) if ext == "png" else b"cap") for i in range(3) for ext in ("png", "txt")]
    full = tar_shard(d / "a-4.tar", members).read_bytes()
    with tarfile.open(d / "a-4.tar") as tf:
        t2 = tf.getmember("t2.png")
    (d / "a-4.tar").write_bytes(full[: t2.offset_data + 10])  # cut inside t2.png: t0 and t1 survive
    (d / "a-5.tar").write_bytes(full[: t2.offset])  # cut at a member boundary: no end-of-archive blocks
    ds = load_dataset(d / "a-{0..5}.tar", ImageTransform(32), max_bad_fraction=0.5)
    got = list(ds.iterate())
    assert ds.skipped["empty_shard"] == 2 and ds.skipped["truncated_shard"] == 2
    assert ds.skipped["corrupt_image"] == 1 and ds.skipped["missing_caption"] == 1  # x; y
    assert ds.skipped["empty_caption"] == 1 and ds.skipped["bad_caption"] == 1  # z; u
    assert ds.skipped["missing_image"] == 1  # w (the cut-off t2 has no usable file: a shard problem only)
    assert len(got) == 40 + 2 * 2 and ds.bad == ds.seen - len(got) == 5


def test_too_many_bad_samples_is_a_clear_error(tmp_path):
    ds = load_dataset(make_bad_imagefolder(tmp_path / "bad", 10), ImageTransform(32), max_bad_fraction=0.2)
    with pytest.raises(LcmkitError, match="10 of 23 samples were unusable.*max_bad_fraction"):
        list(ds.iterate())
    ds = load_dataset(make_bad_imagefolder(tmp_path / "bad2", 400), ImageTransform(32), max_bad_fraction=0.01,
                      min_checked=50)
    with pytest.raises(LcmkitError, match="max_bad_fraction"):  # stops mid-pass, not only at the end
        for _ in ds.iterate(torch.Generator().manual_seed(0)):
            pass
    assert ds.seen < 413


def test_load_dataset_errors(tmp_path):
    with pytest.raises(LcmkitError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LcmkitError, match="neither"):
        load_dataset(tmp_path / "empty")
    tar_shard(tmp_path / "e.tar", [])
    with pytest.raises(LcmkitError, match="no samples"):
        load_dataset(tmp_path / "e.tar")
