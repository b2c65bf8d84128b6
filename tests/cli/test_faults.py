"""Reliability and safety (issue 7): bad input, untrusted files, interrupted runs, numerical faults, full disks.

Every case checks what a user sees: through the real CLI (``lcmkit.cli.main`` in-process, and a real ``lcmkit``
subprocess per command family) a fault ends with a non-zero exit, exactly one line on stderr and no traceback;
work already done is never lost. Untrusted files carry a malicious pickle whose ``__reduce__`` creates a marker
file: the marker must never appear.

Run with ``LCMKIT_FAULTS_REPORT=FILE.jsonl`` and every case appends what it tried to that file (one JSON object
per case: kind, case, ok); ``python benchmarks/faults.py`` does that and writes benchmarks/results/faults.{json,md}.

Models: the tiny random SD of tests/tiny.py, LoRA rank 4, 32 px (4x4 latents), a few steps per run.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from faults_support import (  # noqa: F401
    DISTILL,
    ENV,
    LCMKIT,
    PAYLOADS,
    REPO,
    malicious_bytes,
    one_line_error,
    record,
    run_cli,
    run_lcmkit,
)
from PIL import Image

from lcmkit.cli import main as cli_main
from lcmkit.train.checkpoint import checkpoint_dirs, load_checkpoint


def test_payloads_really_run_code_when_unpickled(tmp_path):
    """The marker test means something: each payload does run code under a plain ``pickle.loads``/``torch.load``."""
    for kind in PAYLOADS:
        m = tmp_path / f"ran-{kind}"
        data = malicious_bytes(m, kind)
        if kind.startswith("torch"):
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            pickle.loads(data)
        assert m.exists(), kind


# --------------------------------------------------------------------------------------------------------------
# untrusted files: LoRAs, pipeline weights, training checkpoints
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".ckpt", ".pt"])
def test_malicious_lora_refused(suffix, tiny_sd_dir, tmp_path, marker, capsys):
    for kind in PAYLOADS:
        lora = tmp_path / f"evil-{kind}{suffix}"
        lora.write_bytes(malicious_bytes(marker, kind))
        for args in (["generate", tiny_sd_dir, "--prompt", "x", "--out", tmp_path / "a.png", "--lora", f"{lora}:0.8"],
                     ["lora", "combine", tiny_sd_dir, "--lora", lora, "--out", tmp_path / "merged"]):
            code, _, err = run_cli(args, capsys)
            ok = one_line_error(code, err) and ("pickle" in err or "not a valid safetensors" in err) \
                and not marker.exists()
            record("untrusted_file", f"LoRA {kind} as {suffix} ({args[0]})", ok)
            assert ok, (kind, suffix, err)
            if suffix != ".safetensors" or kind != "pickle-v0":  # a v0 pickle has no magic: refused as not valid
                assert "safetensors" in err and ("convert" in err or "pickle" in err), err
    assert not (tmp_path / "merged").exists()


def _planted_pipeline(src: Path, dst: Path, marker: Path, how: str, kind: str) -> Path:
    shutil.copytree(src, dst)
    evil = malicious_bytes(marker, kind)
    if how == "unet .bin only":
        (dst / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        (dst / "unet" / "diffusion_pytorch_model.bin").write_bytes(evil)
    elif how == "unet pickle renamed .safetensors":
        (dst / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(evil)
    elif how == "text encoder .bin only":
        (dst / "text_encoder" / "model.safetensors").unlink()
        (dst / "text_encoder" / "pytorch_model.bin").write_bytes(evil)
    elif how == "vae .ckpt only":
        (dst / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        (dst / "vae" / "diffusion_pytorch_model.ckpt").write_bytes(evil)
    return dst


@pytest.mark.parametrize("how", ["unet .bin only", "unet pickle renamed .safetensors", "text encoder .bin only",
                                 "vae .ckpt only"])
def test_malicious_pipeline_weights_refused(how, tiny_sd_dir, tmp_path, marker, capsys):
    from lcmkit.errors import LcmkitError
    from lcmkit.pipelines import load_pipeline

    for kind in ("pickle", "torch-zip"):
        folder = _planted_pipeline(tiny_sd_dir, tmp_path / f"model-{kind}", marker, how, kind)
        code, _, err = run_cli(["generate", folder, "--prompt", "x", "--out", tmp_path / "a.png", "--steps", "1"],
                               capsys)
        ok = one_line_error(code, err) and "safetensors" in err and "convert" in err and not marker.exists()
        record("untrusted_file", f"pipeline: {how} ({kind})", ok)
        assert ok, err
        with pytest.raises(LcmkitError, match="safetensors"):  # the library call refuses the same way
            load_pipeline(folder, device="cpu")
        # even when torch is told to unpickle by default, nothing is loaded
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            with pytest.raises(LcmkitError):
                load_pipeline(folder, device="cpu")
        finally:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]


def test_pickle_checkpoint_as_model_path_refused(tmp_path, marker, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(malicious_bytes(marker, "torch-zip"))
    code, _, err = run_cli(["generate", ckpt, "--prompt", "x", "--out", tmp_path / "a.png"], capsys)
    ok = one_line_error(code, err) and "pickle" in err and not marker.exists()
    record("untrusted_file", "single-file .ckpt as the model", ok)
    assert ok, err


@pytest.fixture(scope="module")
def short_run(tiny_sd_dir, tmp_path_factory):
    """A finished 2-step LoRA distillation (checkpoints at steps 1 and 2); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("short") / "run"
    code = cli_main(["distill", "--teacher", str(tiny_sd_dir), "--out", str(out), *DISTILL, "--max-steps", "2",
                     "--checkpoint-every", "1"])
    assert code == 0
    return out


@pytest.mark.parametrize("planted", ["training_state.pt", "lora.safetensors"])
def test_malicious_checkpoint_file_refused_on_resume(planted, short_run, tiny_sd_dir, tmp_path, marker, capsys):
    for kind in ("torch-zip", "torch-legacy", "pickle"):
        out = tmp_path / f"run-{kind}"
        shutil.copytree(short_run, out)
        latest = checkpoint_dirs(out)[-1]
        (latest / planted).write_bytes(malicious_bytes(marker, kind))
        code, _, err = run_cli(["distill", "--teacher", tiny_sd_dir, "--out", out, *DISTILL, "--max-steps", "4",
                                "--checkpoint-every", "1", "--resume"], capsys)
        ok = one_line_error(code, err) and str(latest) in err and "delete it" in err and not marker.exists()
        record("untrusted_file", f"checkpoint {planted} replaced by {kind}, then --resume", ok)
        assert ok, err
        assert checkpoint_dirs(out)[-1] == latest  # nothing trained past the refused checkpoint


# --------------------------------------------------------------------------------------------------------------
# bad data: skipped and counted, a threshold stops the run, never a crash mid-run
# --------------------------------------------------------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _good(seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "I;16":
        return Image.fromarray((arr[..., 0].astype(np.uint16) * 257))
    return img if mode == "RGB" else img.convert(mode)


def bad_imagefolder(root: Path) -> tuple[Path, dict[str, int]]:
    """3 good RGB images, 5 good non-RGB (converted), and one of every kind of bad sample (expected reasons)."""
    root.mkdir(parents=True)
    rows: list[str] = []

    def add(name: str, data: bytes | None, caption, raw: str | None = None):
        if data is not None:
            (root / name).write_bytes(data)
        rows.append(raw if raw is not None else json.dumps({"file_name": name, "text": caption}))

    for i in range(3):
        add(f"good{i}.png", _png(_good(i)), f"a good image {i}")
    for mode in ("L", "RGBA", "P", "I;16"):
        add(f"mode-{mode.replace(';', '')}.png", _png(_good(10, mode=mode)), f"a {mode} image")
    cmyk = io.BytesIO()
    _good(11).convert("CMYK").save(cmyk, format="JPEG")
    add("cmyk.jpg", cmyk.getvalue(), "a CMYK image")
    full = _png(_good(20))
    add("garbage.png", b"this is not an image at all" * 10, "corrupt")
    add("truncated.png", full[: len(full) // 2], "truncated")
    add("tiny.png", _png(_good(21, size=4)), "too small")
    add("nocaption.png", _png(_good(22)), None, raw=json.dumps({"file_name": "nocaption.png"}))
    add("emptycaption.png", _png(_good(23)), "   ")
    add("numbercaption.png", _png(_good(24)), 5)
    add("missing.png", None, "its file is missing")
    add("", None, None, raw="{not json")
    add("", None, None, raw=json.dumps({"file_name": "../../etc/passwd", "text": "outside"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    expected = {"corrupt_image": 2, "too_small": 1, "missing_caption": 1, "empty_caption": 1, "bad_caption": 1,
                "missing_image": 1, "bad_metadata": 1, "path_outside_dataset": 1}
    return root, expected


def bad_shards(root: Path) -> tuple[Path, dict[str, int]]:
    """A good shard (4 good samples + one without caption + one corrupt image), an empty, a truncated and a
    garbage shard."""
    root.mkdir(parents=True)

    def member(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(root / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(4):
            member(tf, f"{i:06d}.png", _png(_good(30 + i)))
            member(tf, f"{i:06d}.txt", f"shard sample {i}".encode())
        member(tf, "000010.png", _png(_good(40)))           # no caption
        member(tf, "000011.png", b"\x89PNG broken")          # corrupt
        member(tf, "000011.txt", b"corrupt image")
    (root / "shard-000001.tar").write_bytes(b"")             # empty
    with tarfile.open(root / "full.tmp", "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(3):
            member(tf, f"{i:06d}.png", _png(_good(50 + i, size=64)))
            member(tf, f"{i:06d}.txt", f"truncated shard sample {i}".encode())
    data = (root / "full.tmp").read_bytes()
    (root / "full.tmp").unlink()
    (root / "shard-000002.tar").write_bytes(data[: len(data) * 2 // 3])  # truncated mid-member
    (root / "shard-000003.tar").write_bytes(os.urandom(3000))              # garbage
    expected = {"missing_caption": 1, "corrupt_image": 1, "empty_shard": 1, "truncated_shard": 1}
    return root, expected


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_bad_data_is_skipped_and_counted(fmt, tiny_sd_dir, tmp_path, capsys):
    data, expected = (bad_imagefolder if fmt == "imagefolder" else bad_shards)(tmp_path / "data")
    out = tmp_path / "run"
    # batch 4 > the 3 good images in some passes, and 3 steps: every record is visited at least once
    args = ["distill", "--teacher", tiny_sd_dir, "--out", out, *DISTILL, "--data", data, "--batch-size", "4",
            "--max-steps", "3", "--checkpoint-every", "1"]
    code, stdout, err = run_cli(args, capsys)
    summary = json.loads((out / "summary.json").read_text())
    skipped = summary["data_skipped"]
    ok = code == 0 and summary["finished"] and all(skipped.get(k, 0) >= 1 for k in expected)
    for reason, n in expected.items():
        record("bad_data", f"{fmt}: {reason}", skipped.get(reason, 0) >= 1, count=n)
    if fmt == "imagefolder":
        for mode in ("L", "RGBA", "P", "I;16", "CMYK"):
            record("bad_data", f"{fmt}: non-RGB {mode} (converted)", summary["data_converted"].get(mode, 0) >= 1,
                   count=1)
        ok = ok and set(summary["data_converted"]) >= {"L", "RGBA", "P", "I;16", "CMYK"}
    record("bad_data", f"{fmt}: dataset smaller than a batch of usable samples", ok, count=1)
    assert ok, (code, err, summary)
    assert "skipped" in err and "summary.json" in err  # reported at the end, not only in the file
    assert stdout.strip().splitlines() == [str(out / "lora")]


def test_bad_data_threshold_stops_run(tiny_sd_dir, tmp_path, capsys):
    root = tmp_path / "mostly-bad"
    root.mkdir()
    rows = [json.dumps({"file_name": f"good{i}.png", "text": f"good {i}"}) for i in range(2)]
    for i in range(2):
        (root / f"good{i}.png").write_bytes(_png(_good(i)))
    rows += [json.dumps({"file_name": f"gone{i}.png", "text": "missing"}) for i in range(150)]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", "--teacher", tiny_sd_dir, "--out", out, *DISTILL, "--data", root,
                            "--max-steps", "50", "--checkpoint-every", "1"], capsys)
    ok = one_line_error(code, err) and "max_bad_fraction" in err and "missing_image" in err
    record("bad_data", "bad fraction above the threshold stops the run", ok, count=150)
    assert ok, err
    assert not (out / "lora").exists()


def test_empty_and_all_bad_datasets_refused(tiny_sd_dir, tmp_path, capsys):
    cases = {}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    cases["empty metadata.jsonl"] = tmp_path / "empty"
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    cases["only empty shards"] = tmp_path / "shards"
    allbad = tmp_path / "allbad"
    allbad.mkdir()
    (allbad / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"x{i}.png", "text": "t"})
                                                     for i in range(5)))
    cases["no usable sample"] = allbad
    (tmp_path / "nometa").mkdir()
    cases["folder with neither metadata nor shards"] = tmp_path / "nometa"
    for name, data in cases.items():
        code, _, err = run_cli(["distill", "--teacher", tiny_sd_dir, "--out", tmp_path / f"o-{data.name}", *DISTILL,
                                "--data", data, "--max-steps", "2"], capsys)
        ok = one_line_error(code, err)
        record("bad_data", name, ok, count=1)
        assert ok, (name, err)


# --------------------------------------------------------------------------------------------------------------
# bad arguments and mismatches
# --------------------------------------------------------------------------------------------------------------

def _mismatched_loras(tmp_path: Path) -> dict[str, Path]:
    """A LoRA for another base model (cross-attention width 64: shape mismatch) and one whose keys name no layer."""
    import tiny
    from safetensors.torch import load_file, save_file

    other = tiny.tiny_lora_file(tiny.tiny_unet(cross_attention_dim=64), tmp_path / "other-base.safetensors")
    good = tiny.tiny_lora_file(tiny.tiny_unet(), tmp_path / "good.safetensors")
    keys = {k.replace("attn1", "attn9"): v for k, v in load_file(str(good)).items()}
    save_file(keys, str(tmp_path / "wrong-keys.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    return {"shape mismatch": other, "key mismatch": tmp_path / "wrong-keys.safetensors",
            "truncated file": truncated, "missing file": tmp_path / "nope.safetensors"}


def test_generate_bad_arguments_one_line(tiny_sd_dir, tiny_lcm_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    init = tmp_path / "init.png"
    _good(0, 64).save(init)
    base = ["generate", tiny_lcm_dir, "--prompt", "x", "--out", tmp_path / "a.png"]
    cases = {
        "steps 0": base + ["--steps", "0"],
        "steps -3": base + ["--steps", "-3"],
        "strength 1.5": base + ["--init-image", init, "--strength", "1.5"],
        "strength 0": base + ["--init-image", init, "--strength", "0"],
        "strength 0.01 (empty grid)": base + ["--init-image", init, "--strength", "0.01"],
        "strength without init image": base + ["--strength", "0.5"],
        "guidance -1": base + ["--guidance", "-1"],
        "guidance nan": base + ["--guidance", "nan"],
        "guidance inf": base + ["--guidance", "inf"],
        "eta 2": base + ["--sampler", "tcd", "--eta", "2"],
        "height 30 (not a multiple of 8)": base + ["--height", "30"],
        "num-images 0": base + ["--num-images", "0"],
        "out not .png": ["generate", tiny_lcm_dir, "--prompt", "x", "--out", tmp_path / "a.jpg"],
        "out folder missing": ["generate", tiny_lcm_dir, "--prompt", "x", "--out", tmp_path / "no" / "a.png"],
        "missing init image": base + ["--init-image", tmp_path / "nope.png"],
        "missing model folder": ["generate", tmp_path / "nope", "--prompt", "x", "--out", tmp_path / "a.png"],
        "model folder is not a pipeline": ["generate", tmp_path / "empty", "--prompt", "x", "--out", tmp_path / "a.png"],
        "model is a plain file": ["generate", tmp_path / "afile", "--prompt", "x", "--out", tmp_path / "a.png"],
        "negative prompt on a full LCM": base + ["--negative-prompt", "blurry", "--guidance", "8"],
        "missing --prompt": ["generate", tiny_lcm_dir, "--out", tmp_path / "a.png"],
        "steps not a number": base + ["--steps", "four"],
    }
    for name, lora in _mismatched_loras(tmp_path).items():
        cases[f"LoRA {name}"] = ["generate", tiny_sd_dir, "--prompt", "x", "--out", tmp_path / "a.png", "--steps",
                                 "1", "--lora", lora]
    for name, args in cases.items():
        code, _, err = run_cli(args, capsys)
        ok = one_line_error(code, err)
        record("bad_argument", f"generate: {name}", ok)
        assert ok, (name, code, err)
    assert not (tmp_path / "a.png").exists()


def test_training_bad_arguments_one_line(tiny_sd_dir, tiny_lcm_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "used" / "checkpoints").mkdir(parents=True)
    t = ["--teacher", tiny_sd_dir]
    o = ["--out", tmp_path / "o"]
    cases = {
        "distill: skip 0": ["distill", *t, *o, *DISTILL, "--skip", "0"],
        "distill: skip 5000 (> T)": ["distill", *t, *o, *DISTILL, "--skip", "5000", "--max-steps", "1"],
        "distill: omega -1": ["distill", *t, *o, *DISTILL, "--omega", "-1"],
        "distill: omega min > max": ["distill", *t, *o, *DISTILL, "--omega-min", "9", "--omega-max", "2"],
        "distill: lr 0": ["distill", *t, *o, *DISTILL, "--lr", "0"],
        "distill: lr nan": ["distill", *t, *o, *DISTILL, "--lr", "nan"],
        "distill: max-steps 0": ["distill", *t, *o, *DISTILL, "--max-steps", "0"],
        "distill: stop-at > max-steps": ["distill", *t, *o, *DISTILL, "--max-steps", "2", "--stop-at", "5"],
        "distill: resolution 4": ["distill", *t, *o, *DISTILL, "--resolution", "4"],
        "distill: resolution 36 (not a multiple of 8)": ["distill", *t, *o, *DISTILL, "--resolution", "36",
                                                         "--max-steps", "1"],
        "distill: batch-size 0": ["distill", *t, *o, *DISTILL, "--batch-size", "0"],
        "distill: teacher missing": ["distill", "--teacher", tmp_path / "nope", *o, *DISTILL],
        "distill: teacher not a pipeline": ["distill", "--teacher", tmp_path, *o, *DISTILL],
        "distill: teacher is already an LCM": ["distill", "--teacher", tiny_lcm_dir, *o, *DISTILL, "--max-steps", "1"],
        "distill: data missing": ["distill", *t, *o, *DISTILL, "--data", tmp_path / "nodata"],
        "distill: output holds results": ["distill", *t, "--out", tmp_path / "used", *DISTILL],
        "distill: output is a file": ["distill", *t, "--out", tmp_path / "afile", *DISTILL],
        "distill: unknown YAML key": ["distill", "--config", tmp_path / "bad.yaml", *t, *o, *DISTILL],
        "distill: missing config file": ["distill", "--config", tmp_path / "none.yaml", *t, *o, *DISTILL],
        "finetune: model missing": ["finetune", "--model", tmp_path / "nope", "--data", "world", *o],
        "finetune: max-steps 0": ["finetune", "--model", tiny_lcm_dir, "--data", "world", *o, "--max-steps", "0"],
        "lora train: out not .safetensors": ["lora", "train", "--model", tiny_sd_dir, "--data", "world", "--out",
                                             tmp_path / "s.bin"],
        "lora train: lr -1": ["lora", "train", "--model", tiny_sd_dir, "--data", "world", "--out",
                              tmp_path / "s.safetensors", "--lr", "-1"],
        "lora combine: out not empty": ["lora", "combine", tiny_sd_dir, "--lora", tmp_path / "x.safetensors",
                                        "--out", tmp_path / "used"],
    }
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    for name, args in cases.items():
        code, _, err = run_cli(args, capsys)
        ok = one_line_error(code, err)
        record("bad_argument", name, ok)
        assert ok, (name, code, err)
    assert not list((tmp_path / "used").glob("checkpoints/*"))  # the refused output folder is untouched


def _subprocess_cases(tmp: Path, sd: Path, marker: Path) -> dict[str, list]:
    """One real ``lcmkit`` subprocess per command family (plus the malicious LoRA)."""
    import tiny

    (tmp / "nonempty").mkdir()
    (tmp / "nonempty" / "f").write_text("x")
    (tmp / "used").mkdir()
    (tmp / "used" / "eval.json").write_text("{}")
    (tmp / "clf").mkdir()
    (tmp / "clf" / "model.safetensors").write_bytes(b"")
    (tmp / "evil.safetensors").write_bytes(malicious_bytes(marker, "pickle"))
    (tmp / "evil.bin").write_bytes(malicious_bytes(marker, "torch-zip"))
    other = tiny.tiny_lora_file(tiny.tiny_unet(cross_attention_dim=64), tmp / "other.safetensors")
    allbad = tmp / "allbad"
    allbad.mkdir()
    (allbad / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "t"}) + "\n")
    return {
        "generate: LoRA for another base model": ["generate", sd, "--prompt", "x", "--out", tmp / "a.png",
                                                  "--lora", other, "--steps", "1"],
        "generate: pickle named .safetensors as LoRA": ["generate", sd, "--prompt", "x", "--out", tmp / "a.png",
                                                        "--lora", tmp / "evil.safetensors"],
        "distill: no usable sample": ["distill", "--teacher", sd, "--out", tmp / "d", *DISTILL, "--data", allbad],
        "finetune: max-steps 0": ["finetune", "--model", sd, "--data", "world", "--out", tmp / "f", "--max-steps", "0"],
        "lora train: --out not .safetensors": ["lora", "train", "--model", sd, "--data", "world", "--out",
                                               tmp / "s.bin"],
        "lora combine: .bin pickle as LoRA": ["lora", "combine", sd, "--lora", tmp / "evil.bin", "--out", tmp / "c"],
        "eval: output holds results": ["eval", sd, "--out", tmp / "used"],
        "world export: output not empty": ["world", "export", "--out", tmp / "nonempty", "--n", "3"],
        "world train-teacher: bad channels": ["world", "train-teacher", "--out", tmp / "t", "--unet-channels", "a,b"],
        "world train-classifier: output holds a classifier": ["world", "train-classifier", "--out", tmp / "clf"],
        "bench speed: repeats 0": ["bench", "speed", "--repeats", "0"],
        "demo: steps 0": ["demo", "--out", tmp / "demo", "--steps", "0"],
        "no command arguments": ["distill", "--max-steps", "many"],
    }


def test_every_command_family_subprocess_one_line(tiny_sd_dir, tmp_path, marker):
    cases = _subprocess_cases(tmp_path, tiny_sd_dir, marker)
    with ThreadPoolExecutor(max_workers=3) as pool:  # import-bound: a little parallelism saves wall time
        results = dict(zip(cases, pool.map(run_lcmkit, cases.values())))
    failures = []
    for name, proc in results.items():
        ok = one_line_error(proc.returncode, proc.stderr) and not marker.exists()
        record("bad_argument", f"subprocess {name}", ok)
        if not ok:
            failures.append((name, proc.returncode, proc.stderr[-2000:]))
    assert not failures, failures
    assert not (tmp_path / "clf" / "model.safetensors").read_bytes()  # not overwritten


# --------------------------------------------------------------------------------------------------------------
# numerical faults
# --------------------------------------------------------------------------------------------------------------

class _InfGrad(torch.autograd.Function):
    """Identity forward (a finite loss), non-finite gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _faulty_loss(monkeypatch, faults: dict[int, str]):
    """Make call i of the loss non-finite: "nan" loss or "inf" gradients (finite loss)."""
    import lcmkit.train.distill as mod

    real, calls = mod.lcd_loss, [0]

    def lcd_loss(*args, **kw):
        loss, terms = real(*args, **kw)
        calls[0] += 1
        fault = faults.get(calls[0])
        if fault == "nan":
            loss = loss * float("nan")
        elif fault == "inf":
            loss = _InfGrad.apply(loss)
        return loss, terms

    monkeypatch.setattr(mod, "lcd_loss", lcd_loss)


def test_nonfinite_steps_skipped_and_counted(monkeypatch, tiny_sd_dir, tmp_path, capsys):
    _faulty_loss(monkeypatch, {2: "nan", 4: "inf"})
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", "--teacher", tiny_sd_dir, "--out", out, *DISTILL, "--max-steps", "5",
                            "--checkpoint-every", "5"], capsys)
    summary = json.loads((out / "summary.json").read_text())
    weights, _ = load_checkpoint(checkpoint_dirs(out)[-1])
    finite = all(bool(torch.isfinite(v).all()) for v in weights["lora"].values())
    ok = code == 0 and summary["finished"] and summary["nonfinite_skipped"] == 2 and finite
    record("numerical", "NaN loss once: step skipped and counted", ok)
    record("numerical", "inf gradient once: step skipped and counted", ok)
    assert ok, (code, err, summary)


def test_nonfinite_in_a_row_stops_keeping_last_good_checkpoint(monkeypatch, tiny_sd_dir, tmp_path, capsys):
    _faulty_loss(monkeypatch, {i: "nan" for i in range(3, 100)})
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", "--teacher", tiny_sd_dir, "--out", out, *DISTILL, "--max-steps", "10",
                            "--checkpoint-every", "1", "--max-nonfinite", "3"], capsys)
    latest = checkpoint_dirs(out)[-1]
    weights, state = load_checkpoint(latest)
    ok = one_line_error(code, err) and "fp16 overflow" in err and "last good checkpoint" in err \
        and latest.name == "step-0000004" and all(bool(torch.isfinite(v).all()) for v in weights["lora"].values())
    # steps 3 and 4 were skipped but checkpointed (their weights are the good ones of step 2); step 5 stopped it
    record("numerical", "non-finite loss 3 times in a row: stop, name the cause, keep last good checkpoint", ok)
    assert ok, (code, err, latest)
    assert not (out / "lora").exists()


# --------------------------------------------------------------------------------------------------------------
# disk full / unwritable output
# --------------------------------------------------------------------------------------------------------------

def _enospc(path=""):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["safetensors weights", "training state", "rename"])
def test_disk_full_during_checkpoint(where, monkeypatch, tiny_sd_dir, tmp_path, capsys):
    import safetensors.torch

    out = tmp_path / "run"
    args = ["distill", "--teacher", tiny_sd_dir, "--out", out, *DISTILL, "--max-steps", "3", "--checkpoint-every", "1"]
    calls = {"n": 0}
    if where == "safetensors weights":
        real = safetensors.torch.save_file

        def fake(tensors, filename, *a, **kw):
            if "step-0000002" in str(filename):
                raise _enospc(filename)
            return real(tensors, filename, *a, **kw)
        monkeypatch.setattr(safetensors.torch, "save_file", fake)
    elif where == "training state":
        real = torch.save

        def fake(obj, f, *a, **kw):
            if "step-0000002" in str(f):
                raise _enospc(f)
            return real(obj, f, *a, **kw)
        monkeypatch.setattr(torch, "save", fake)
    else:
        real = os.replace

        def fake(src, dst, *a, **kw):
            if str(dst).endswith("step-0000002"):
                calls["n"] += 1
                raise _enospc(dst)
            return real(src, dst, *a, **kw)
        monkeypatch.setattr(os, "replace", fake)
    code, _, err = run_cli(args, capsys)
    monkeypatch.undo()
    ckpts = checkpoint_dirs(out)
    ok = one_line_error(code, err) and "no space left on device" in err and "--resume" in err \
        and [c.name for c in ckpts] == ["step-0000001"] and not list((out / "checkpoints").glob(".tmp-*"))
    load_checkpoint(ckpts[-1])  # the previous checkpoint still loads
    record("disk", f"ENOSPC while writing a checkpoint ({where})", ok)
    assert ok, (code, err, ckpts)
    if where == "rename":  # and the run continues from it once there is space again
        code, _, err = run_cli(args + ["--resume"], capsys)
        assert code == 0, err
        assert checkpoint_dirs(out)[-1].name == "step-0000003" and (out / "lora").is_dir()


def test_disk_full_writing_an_image(monkeypatch, tiny_lcm_dir, tmp_path, capsys):
    def fake(self, fp, *a, **kw):
        raise _enospc(fp)

    monkeypatch.setattr(Image.Image, "save", fake)
    code, _, err = run_cli(["generate", tiny_lcm_dir, "--prompt", "x", "--out", tmp_path / "a.png", "--steps", "1"],
                           capsys)
    ok = one_line_error(code, err) and "no space left on device" in err
    record("disk", "ENOSPC while saving a generated image", ok)
    assert ok, err


def test_unwritable_output_refused_before_training(monkeypatch, tiny_sd_dir, tmp_path, capsys):
    import tempfile

    (tmp_path / "afile").write_text("x")
    cases = {"output under a regular file": tmp_path / "afile" / "run"}
    if os.geteuid() != 0:  # root writes through chmod 0o500, so this case only means something for a normal user
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        cases["read-only folder (chmod 0o500)"] = ro / "run"
    for name, out in cases.items():
        code, _, err = run_cli(["distill", "--teacher", tiny_sd_dir, "--out", out, *DISTILL, "--max-steps", "2"],
                               capsys)
        ok = one_line_error(code, err) and "cannot be written" in err
        record("disk", f"unwritable output: {name}", ok)
        assert ok, (name, err)
    # the pre-flight write check itself (what chmod would trigger for a normal user), as root too
    real = tempfile.NamedTemporaryFile

    def denied(*a, **kw):
        if "write-check" in str(kw.get("prefix", "")):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, **kw)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    out = tmp_path / "denied"
    code, _, err = run_cli(["distill", "--teacher", tiny_sd_dir, "--out", out, *DISTILL, "--max-steps", "2"], capsys)
    monkeypatch.undo()
    ok = one_line_error(code, err) and "cannot be written" in err and "Permission denied" in err \
        and not (out / "checkpoints").exists() and not (out / "logs").exists()  # before any training step
    record("disk", "unwritable output: permission denied at the pre-flight check", ok)
    assert ok, err


# --------------------------------------------------------------------------------------------------------------
# interrupted runs: SIGKILL at random moments, --resume, same weights bit for bit
# --------------------------------------------------------------------------------------------------------------

KILL_STEPS = 20
KILL_CYCLES = 6


def _latest_step(out: Path) -> int:
    found = checkpoint_dirs(out)
    return int(found[-1].name.split("-")[1]) if found else 0


def _distill_cmd(teacher: Path, out: Path, resume: bool) -> list[str]:
    return [str(LCMKIT), "distill", "--teacher", str(teacher), "--out", str(out), *DISTILL,
            "--max-steps", str(KILL_STEPS), "--checkpoint-every", "1", "--keep-checkpoints", "2",
            *(["--resume"] if resume else [])]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tiny_sd_dir, tmp_path):
    from safetensors.torch import load_file

    rng = random.Random(7)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.run(_distill_cmd(tiny_sd_dir, straight, False), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cycles = []
    for cycle in range(KILL_CYCLES):
        before = _latest_step(killed)
        during_write = cycle % 2 == 1  # odd cycles: aim at a checkpoint being written
        p = subprocess.Popen(_distill_cmd(tiny_sd_dir, killed, resume=cycle > 0), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while _latest_step(killed) <= before and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the run has made progress past where it started
        assert p.poll() is None, f"cycle {cycle}: the run ended before it was killed: {p.stderr.read()[-2000:]}"
        in_write = False
        if during_write:
            t_end = time.monotonic() + 5
            while time.monotonic() < t_end and not any((killed / "checkpoints").glob(".tmp-step-*")):
                time.sleep(0.0005)
            in_write = any((killed / "checkpoints").glob(".tmp-step-*"))
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        done = _latest_step(killed)  # complete checkpoints the run had written before the kill
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        after = _latest_step(killed)
        load_checkpoint(checkpoint_dirs(killed)[-1])  # the last complete checkpoint is usable
        lost = max(0, done - after)
        cycles.append({"cycle": cycle, "resumed_from": before, "killed_after_step": done, "on_disk": after,
                       "during_checkpoint_write": in_write, "steps_lost": lost})
        assert lost == 0 and after >= before, cycles[-1]
        if after >= KILL_STEPS - 2:
            break

    proc = subprocess.run(_distill_cmd(tiny_sd_dir, killed, True), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = checkpoint_dirs(straight)[-1], checkpoint_dirs(killed)[-1]
    assert a.name == b.name == f"step-{KILL_STEPS:07d}"
    same = True
    for fa, fb in [(a / "lora.safetensors", b / "lora.safetensors"),
                   *[(f, killed / "lora" / f.name) for f in sorted((straight / "lora").glob("*.safetensors"))]]:
        wa, wb = load_file(str(fa)), load_file(str(fb))
        same &= wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = load_checkpoint(a)[1], load_checkpoint(b)[1]
    same &= sa["step"] == sb["step"] and torch.equal(sa["data"]["position"], sb["data"]["position"])
    for c in cycles:
        record("kill_resume", f"SIGKILL cycle {c['cycle']}", same and c["steps_lost"] == 0, **c)
    assert len(cycles) >= 5, cycles
    assert same, "the resumed run's final weights differ from the uninterrupted run's"
