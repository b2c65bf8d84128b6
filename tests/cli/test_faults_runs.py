"""Reliability of runs and their folders (issue 20, items 1-4, 9, 10): what a hostile or careless user found.

Through the real CLI (``lcmkit.cli.main`` in-process, real ``lcmkit`` subprocesses where two runs must overlap or one
must be killed), each case checks what a user sees and what is left on disk:

1. a pickle reached through a safetensors index, a shard name, a link or a stray weight file is refused by name;
2. a failed ``--overwrite`` rerun leaves the old results bit for bit; a user's own files are never deleted;
3. a second run into a folder in use is refused at once, naming the holder; a killed run's lock is taken over;
4. ``--resume`` with a changed recipe is refused field by field (``--allow-changed-recipe`` records it), nothing
   written first; damaged checkpoints give the "delete it" message;
9. ``--config`` YAML: numbers as people write them, every field type-checked, no aliases, capped size and depth;
10. output paths: no dangling link followed, no folder replaced by a PNG, no checkpoint link out of a run folder.

Models: the tiny random SD of tests/tiny.py, LoRA rank 4, 32 px, a few steps per run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from faults_support import (
    DISTILL,
    ENV,
    LCMKIT,
    malicious_bytes,
    one_line_error,
    record,
    run_cli,
)

from lcmkit.cli import main as cli_main
from lcmkit.train.checkpoint import STATE_FILE, checkpoint_dirs, load_checkpoint


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` → its sha256 (links: their target's text): a folder's exact state."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def short_run(tiny_sd_dir, tmp_path_factory):
    """A finished 2-step LoRA distillation (checkpoints at steps 1 and 2); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("short") / "run"
    code = cli_main(["distill", "--teacher", str(tiny_sd_dir), "--out", str(out), *DISTILL, "--max-steps", "2",
                     "--checkpoint-every", "1"])
    assert code == 0
    return out


def _distill(teacher, out, *extra) -> list:
    return ["distill", "--teacher", teacher, "--out", out, *DISTILL, "--checkpoint-every", "1", *extra]


# --------------------------------------------------------------------------------------------------------------
# 1. weights: safetensors only, however a file is reached
# --------------------------------------------------------------------------------------------------------------

def _plant(src: Path, dst: Path, marker: Path, how: str, outside: Path) -> tuple[Path, str]:
    """A copy of the pipeline ``src`` with one way of reaching a pickle planted; (folder, the name the error gives)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    unet = dst / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    evil = malicious_bytes(marker, "torch-zip")

    def index(shards: dict[str, str]) -> None:  # a decoy safetensors beside an index that sends diffusers elsewhere
        save_file({"decoy": torch.zeros(1)}, str(unet / "decoy.safetensors"))
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": shards}))

    keys = list(load_file(str(weights)))
    if how == "index -> .bin shard holding the real weights (weights_only-loadable)":
        torch.save(load_file(str(weights)), unet / "shard.bin")
        weights.unlink()
        index({k: "shard.bin" for k in keys})
        return dst, "shard.bin"
    if how == "index -> .bin shard (pickle)":
        (unet / "evil.bin").write_bytes(evil)
        weights.unlink()
        index({k: "evil.bin" for k in keys})
        return dst, "evil.bin"
    if how == "index -> extension-less shard (torch.save of the real weights)":
        torch.save(load_file(str(weights)), unet / "diffusion_pytorch_model-00001-of-00001")
        weights.unlink()
        index({k: "diffusion_pytorch_model-00001-of-00001" for k in keys})
        return dst, "diffusion_pytorch_model-00001-of-00001"
    if how == "index -> pickle named .safetensors":
        (unet / "shard-1.safetensors").write_bytes(evil)
        weights.unlink()
        index({k: "shard-1.safetensors" for k in keys})
        return dst, "shard-1.safetensors"
    if how == "index -> shard outside the folder (../)":
        (outside / "far.safetensors").write_bytes(weights.read_bytes())
        weights.unlink()
        index({k: "../../far.safetensors" for k in keys})
        return dst, "../../far.safetensors"
    if how == "index that is not JSON":
        weights.unlink()
        save_file({"decoy": torch.zeros(1)}, str(unet / "decoy.safetensors"))
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
        return dst, "diffusion_pytorch_model.safetensors.index.json"
    if how == "weights link to a file outside the folder":
        (outside / "elsewhere.safetensors").write_bytes(weights.read_bytes())
        weights.unlink()
        weights.symlink_to(outside / "elsewhere.safetensors")
        return dst, "diffusion_pytorch_model.safetensors"
    if how == "weights link to a pickle inside the folder":
        (dst / "evil.bin").write_bytes(evil)
        weights.unlink()
        weights.symlink_to(Path("..") / "evil.bin")
        return dst, "diffusion_pytorch_model.safetensors"
    if how == "component folder links outside":
        shutil.move(str(unet), str(outside / "unet"))
        unet.symlink_to(outside / "unet", target_is_directory=True)
        return dst, "unet"
    if how == "pickled .bin beside the safetensors":
        (dst / "text_encoder" / "pytorch_model.bin").write_bytes(evil)
        return dst, "text_encoder/pytorch_model.bin"
    for suffix in (".msgpack", ".h5", ".pt", ".pkl"):
        if how == f"{suffix} in a component folder":
            (dst / "vae" / f"diffusion_pytorch_model{suffix}").write_bytes(evil)
            return dst, f"vae/diffusion_pytorch_model{suffix}"
    raise AssertionError(how)


PLANTS = ["index -> .bin shard holding the real weights (weights_only-loadable)", "index -> .bin shard (pickle)",
          "index -> extension-less shard (torch.save of the real weights)", "index -> pickle named .safetensors",
          "index -> shard outside the folder (../)", "index that is not JSON",
          "weights link to a file outside the folder", "weights link to a pickle inside the folder",
          "component folder links outside", "pickled .bin beside the safetensors", ".msgpack in a component folder",
          ".h5 in a component folder", ".pt in a component folder", ".pkl in a component folder"]


@pytest.mark.parametrize("how", PLANTS)
def test_weights_however_reached_must_be_safetensors(how, tiny_sd_dir, tmp_path, marker, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder, named = _plant(tiny_sd_dir, tmp_path / "model", marker, how, outside)
    code, _, err = run_cli(["generate", folder, "--prompt", "x", "--out", tmp_path / "a.png", "--steps", "1"], capsys)
    ok = one_line_error(code, err) and named in err and not marker.exists() and not (tmp_path / "a.png").exists()
    record("untrusted_file", f"pipeline weights: {how} (generate)", ok)
    assert ok, err
    if how == PLANTS[1]:  # a teacher and an --init-from reach the same check
        code, _, err = run_cli(_distill(folder, tmp_path / "run", "--max-steps", "1"), capsys)
        ok = one_line_error(code, err) and named in err and not marker.exists() \
            and not (tmp_path / "run" / "checkpoints").exists()
        record("untrusted_file", f"pipeline weights: {how} (distill --teacher)", ok)
        assert ok, err
        code, _, err = run_cli(["world", "train-teacher", "--out", tmp_path / "teacher", "--init-from", folder,
                                "--unet-steps", "1", "--num-images", "8", "--threads", "1", "--no-progress"], capsys)
        ok = one_line_error(code, err) and named in err and "--init-from" in err and not marker.exists()
        record("untrusted_file", f"pipeline weights: {how} (world train-teacher --init-from)", ok)
        assert ok, err


def test_hugging_face_cache_layout_still_loads(tiny_sd_dir, tmp_path, capsys):
    """The refusals are not over-broad: a snapshot of the hub cache (every file a link into ``blobs/``) loads."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    blobs.mkdir(parents=True)
    for i, f in enumerate(p for p in sorted(tiny_sd_dir.rglob("*")) if p.is_file()):
        rel = f.relative_to(tiny_sd_dir)
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blobs / f"blob{i}", (snap / rel).parent))
    code, out, err = run_cli(["generate", snap, "--prompt", "x", "--out", tmp_path / "a.png", "--steps", "1"], capsys)
    ok = code == 0 and (tmp_path / "a.png").is_file()
    record("untrusted_file", "hub-cache snapshot (links into blobs/) still loads", ok)
    assert ok, err


# --------------------------------------------------------------------------------------------------------------
# 2. --overwrite loses nothing
# --------------------------------------------------------------------------------------------------------------

def _broken_teacher(src: Path, dst: Path) -> Path:
    """A teacher that passes the argument checks (model_index.json is there) and fails to load."""
    shutil.copytree(src, dst)
    (dst / "unet" / "config.json").write_text("{ this is not json")
    return dst


def test_failed_overwrite_keeps_the_old_results_bit_for_bit(short_run, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    before = tree(out)
    allbad = tmp_path / "allbad"
    allbad.mkdir()
    (allbad / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "t"}) + "\n")
    failures = {
        "teacher fails to load": _distill(_broken_teacher(tiny_sd_dir, tmp_path / "broken"), out, "--max-steps", "2",
                                          "--overwrite"),
        # fails after config.yaml and the data set-up: the new run's config must not stay over the old one's
        "no usable sample in the data": _distill(tiny_sd_dir, out, "--max-steps", "2", "--overwrite", "--data", allbad),
    }
    for name, args in failures.items():
        code, _, err = run_cli(args, capsys)
        ok = one_line_error(code, err) and tree(out) == before
        record("disk", f"--overwrite rerun fails ({name}): old results kept bit for bit", ok)
        assert ok, (name, err, set(before) ^ set(tree(out)))
    # and a rerun that works does replace them
    code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "1", "--overwrite"), capsys)
    assert code == 0, err
    assert [c.name for c in checkpoint_dirs(out)] == ["step-0000001"] and not (out / ".lcmkit-replaced").exists()
    assert json.loads((out / "summary.json").read_text())["max_steps"] == 1


def test_overwrite_killed_before_its_first_checkpoint_gives_the_old_results_back(short_run, tiny_sd_dir, tmp_path,
                                                                                 capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    before = tree(out)
    cmd = [str(LCMKIT), *map(str, _distill(tiny_sd_dir, out, "--max-steps", "100000", "--checkpoint-every",
                                           "100000", "--overwrite"))]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        started = lambda: (out / ".lcmkit-replaced").is_dir() and (out / "logs" / "log.jsonl").is_file()  # noqa: E731
        while not started() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # training has started: the old results are aside, the new run has no checkpoint
        time.sleep(0.5)
        assert p.poll() is None and started() and not (out / "checkpoints").exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    code, stdout, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "2"), capsys)  # no flag: refused
    ok = one_line_error(code, err) and "already has results" in err and "put back" in stdout \
        and tree(out) == before
    record("run_folder", "SIGKILL of an --overwrite run before its first checkpoint: old results come back", ok)
    assert ok, (err, stdout, set(before) ^ set(tree(out)))


def test_overwrite_never_deletes_the_users_own_files(short_run, tiny_sd_dir, tmp_path, capsys):
    # a folder that is no lcmkit run, with the user's own folders of lcmkit's names
    mine = tmp_path / "mine"
    (mine / "validation").mkdir(parents=True)
    (mine / "validation" / "holiday.jpg").write_bytes(b"my photo")
    (mine / "lora").mkdir()
    (mine / "lora" / "my_style.safetensors").write_bytes(b"my lora")
    (mine / "notes.txt").write_text("mine")
    before = tree(mine)
    code, _, err = run_cli(_distill(tiny_sd_dir, mine, "--max-steps", "1", "--overwrite"), capsys)
    ok = one_line_error(code, err) and "not one of its results" in err and tree(mine) == before
    record("disk", "--overwrite into a folder of the user's with lcmkit's names: refused, nothing deleted", ok)
    assert ok, err
    # an lcmkit run with a file of the user's inside checkpoints/: refused, nothing moved
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    (run / "checkpoints" / "README.txt").write_text("which run was this")
    before = tree(run)
    code, _, err = run_cli(_distill(tiny_sd_dir, run, "--max-steps", "1", "--overwrite"), capsys)
    ok = one_line_error(code, err) and "README.txt" in err and tree(run) == before
    record("disk", "--overwrite with a user's file inside checkpoints/: refused, naming it", ok)
    assert ok, err
    # an lcmkit run with unrelated files of the user's beside it: replaced, the user's files kept bit for bit
    (run / "checkpoints" / "README.txt").unlink()
    (run / "notes.txt").write_text("keep me")
    (run / "my-data").mkdir()
    (run / "my-data" / "a.png").write_bytes(b"\x89PNG mine")
    (run / "logs" / "my-notes.md").write_text("my notes among the logs")
    kept = {k: v for k, v in tree(run).items() if k.startswith(("notes.txt", "my-data", "logs/my-notes.md"))}
    code, _, err = run_cli(_distill(tiny_sd_dir, run, "--max-steps", "1", "--overwrite"), capsys)
    after = tree(run)
    ok = code == 0 and all(after.get(k) == v for k, v in kept.items()) \
        and [c.name for c in checkpoint_dirs(run)] == ["step-0000001"]
    record("disk", "--overwrite of an lcmkit run: the user's unrelated files in --out kept bit for bit", ok)
    assert ok, (err, kept, after)


# --------------------------------------------------------------------------------------------------------------
# 3. one run at a time in a folder
# --------------------------------------------------------------------------------------------------------------

def _holder_pid(out: Path) -> int | None:
    try:
        return json.loads((out / ".lcmkit-lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(short_run, tiny_sd_dir,
                                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    first = subprocess.Popen([str(LCMKIT), *map(str, _distill(tiny_sd_dir, out, "--max-steps", "100000",
                                                              "--checkpoint-every", "100000", "--resume"))],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _holder_pid(out) != first.pid and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and _holder_pid(out) == first.pid
        state = tree(out / "checkpoints")
        for second in (["--resume"], ["--overwrite"], []):
            t0 = time.monotonic()
            code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "3", *second), capsys)
            ok = one_line_error(code, err) and "in use by another run" in err and f"pid {first.pid}" in err \
                and socket.gethostname() in err and time.monotonic() - t0 < 20 and tree(out / "checkpoints") == state
            record("run_folder", f"second run ({' '.join(second) or 'plain'}) into a folder in use: refused at once, "
                                  "naming pid and host", ok)
            assert ok, (second, err)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".lcmkit-lock").exists()  # the killed run's lock file is left behind ...
    code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "3", "--resume"), capsys)
    ok = code == 0 and checkpoint_dirs(out)[-1].name == "step-0000003" and not (out / ".lcmkit-lock").exists()
    record("run_folder", "stale lock of a SIGKILLed run: taken over by the next --resume", ok)
    assert ok, err


def test_without_flock_a_live_pid_holds_the_folder_and_a_dead_one_does_not(monkeypatch, tiny_sd_dir, tmp_path,
                                                                           capsys):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # a file system without flock: the pid check decides
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lcmkit-lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "1"), capsys)
        ok = one_line_error(code, err) and f"pid {sleeper.pid}" in err
        record("run_folder", "no flock: a lock whose pid is alive on this host refuses the run", ok)
        assert ok, err
    finally:
        sleeper.kill()
        sleeper.wait()
    code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "1"), capsys)
    ok = code == 0 and (out / "lora").is_dir()
    record("run_folder", "no flock: a lock whose pid is dead is taken over", ok)
    assert ok, err


# --------------------------------------------------------------------------------------------------------------
# 4. --resume: the same recipe, or refused; damaged checkpoints
# --------------------------------------------------------------------------------------------------------------

CHANGES = {
    "teacher": None,  # another folder (a copy), filled in below
    "skip": ["--skip", "10"], "solver": ["--solver", "dpm-solver"], "loss": ["--loss", "l2"],
    "lr": ["--lr", "2e-3"], "seed": ["--seed", "1"], "batch_size": ["--batch-size", "1"],
    "data": ["--data", "world:open"], "resolution": ["--resolution", "16"],
    "mode": ["--mode", "full"], "lora_rank": ["--lora-rank", "8"],
}


def test_resume_with_a_changed_recipe_is_refused_writing_nothing(short_run, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    before = tree(out)
    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_sd_dir, other)
    CHANGES["teacher"] = ["--teacher", other]
    for field, flags in CHANGES.items():
        code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "3", "--resume", *flags), capsys)
        ok = one_line_error(code, err) and field in err and tree(out) == before
        record("bad_argument", f"--resume with another {field}: refused naming it, nothing written", ok)
        assert ok, (field, err, set(before) ^ set(tree(out)))
    code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "3", "--resume", "--lr", "2e-3", "--seed", "1"),
                           capsys)
    assert code == 2 and "lr" in err and "seed" in err  # every changed field is named
    # an explicit flag lets it continue, and says so in the logs
    code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "3", "--resume", "--lr", "2e-3",
                                    "--allow-changed-recipe"), capsys)
    entries = [json.loads(line) for line in (out / "logs" / "resumes.jsonl").read_text().splitlines()]
    ok = code == 0 and checkpoint_dirs(out)[-1].name == "step-0000003" and entries[-1]["changed"] == {
        "lr": [1e-3, 2e-3]} and entries[-1]["step"] == 2
    record("bad_argument", "--resume --allow-changed-recipe: continues, recorded in logs/resumes.jsonl", ok)
    assert ok, (err, entries)


def _damage(ckpt: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    lora = ckpt / "lora.safetensors"
    if how == "lora.safetensors missing":
        lora.unlink()
    elif how == "training state without rng":
        state = torch.load(ckpt / STATE_FILE, weights_only=True)
        del state["rng"]
        torch.save(state, ckpt / STATE_FILE)
    elif how in ("a LoRA tensor of a shape that broadcasts", "NaN in a LoRA weight"):
        tensors = load_file(str(lora))
        name = next(k for k in sorted(tensors) if "lora_A" in k)
        t = tensors[name]
        tensors[name] = t[:1].clone() if how.startswith("a LoRA") else torch.full_like(t, float("nan"))
        save_file(tensors, str(lora))
    elif how == "NaN in the optimizer state":
        state = torch.load(ckpt / STATE_FILE, weights_only=True)
        first = next(iter(state["optimizer"]["state"].values()))
        first["exp_avg"].fill_(float("nan"))
        torch.save(state, ckpt / STATE_FILE)
    elif how == "its config.yaml an alias bomb":
        (ckpt / "config.yaml").write_text('a: &a ["x","x"]\nb: &b [*a,*a]\nc: [*b,*b]\n')
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["lora.safetensors missing", "training state without rng",
                                 "a LoRA tensor of a shape that broadcasts", "NaN in a LoRA weight",
                                 "NaN in the optimizer state", "its config.yaml an alias bomb"])
def test_damaged_checkpoint_says_delete_it(how, short_run, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    latest = checkpoint_dirs(out)[-1]
    _damage(latest, how)
    before = tree(out)
    args = _distill(tiny_sd_dir, out, "--max-steps", "3", "--resume")
    code, _, err = run_cli(args, capsys)
    ok = one_line_error(code, err) and str(latest) in err and "delete it to resume from the one before" in err \
        and tree(out) == before
    record("run_folder", f"damaged checkpoint ({how}): 'delete it' message, nothing written", ok)
    assert ok, err
    if how == "a LoRA tensor of a shape that broadcasts":  # and doing what it says works
        shutil.rmtree(latest)
        code, _, err = run_cli(args, capsys)
        weights, _ = load_checkpoint(checkpoint_dirs(out)[-1])
        assert code == 0 and checkpoint_dirs(out)[-1].name == "step-0000003", err
        assert all(bool(torch.isfinite(v).all()) for v in weights["lora"].values())


# --------------------------------------------------------------------------------------------------------------
# 9. --config YAML
# --------------------------------------------------------------------------------------------------------------

YAML_REFUSED = {  # case → (file content, a word the one-line error must contain)
    "alias bomb in validation_prompts (352 bytes)": (
        "validation_prompts: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n"
        "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
        "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n", "alias"),
    "batch_size: 2.5": ("batch_size: 2.5\n", "batch_size"),
    "seed: \"abc\"": ("seed: \"abc\"\n", "seed"),
    "max_steps: .inf": ("max_steps: .inf\n", "max_steps"),
    "batch_size: true": ("batch_size: true\n", "batch_size"),
    "lr: \"1e-4\" (quoted)": ("lr: \"1e-4\"\n", "lr"),
    "resolution: 32.5": ("resolution: 32.5\n", "resolution"),
    "crop: no (a bool for text)": ("crop: no\n", "crop"),
    "validation_prompts: a single string": ("validation_prompts: a cat\n", "validation_prompts"),
    "optim: 5 (a section that is not one)": ("optim: 5\n", "optim"),
    "a key given twice": ("lr: 0.001\nlr: 0.002\n", "twice"),
    "non-UTF-8 bytes": (b"lr: 0.001\nvalidation_prompts: [\"caf\xe9\"]\n", "UTF-8"),
    "nesting 10,000 deep": ("validation_prompts: " + "[" * 10000 + "]" * 10000 + "\n", "nested"),
    "a 2 MB file": ("validation_prompts:\n" + "  - padding padding padding\n" * 80000, "MiB"),
}


def test_yaml_config_refusals_are_one_line_naming_the_field(tiny_sd_dir, tmp_path, capsys):
    for i, (name, (content, word)) in enumerate(YAML_REFUSED.items()):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
        out = tmp_path / f"o{i}"
        t0 = time.monotonic()
        code, _, err = run_cli(_distill(tiny_sd_dir, out, "--max-steps", "1", "--config", cfg), capsys)
        ok = one_line_error(code, err) and word in err and not out.exists() and time.monotonic() - t0 < 30
        record("bad_argument", f"--config YAML: {name}", ok)
        assert ok, (name, err)


def test_yaml_numbers_as_people_write_them(tiny_sd_dir, tmp_path, capsys):
    from lcmkit.train.config import build_config
    from lcmkit.train.distill import DistillConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-4\nadam_eps: 1E-8\nmax_grad_norm: 1.0e0\ngenerated_samples: 1_000\nmax_steps: 1e3\n")
    built = build_config(DistillConfig, cfg, {"teacher": str(tiny_sd_dir), "data": "world", "out": "x"})
    assert (built.optim.lr, built.optim.adam_eps, built.optim.max_grad_norm) == (1e-4, 1e-8, 1.0)
    assert (built.generated_samples, built.max_steps) == (1000, 1000) and isinstance(built.max_steps, int)
    # and through the CLI: a run from that file trains with lr 1e-4 (as written), not a refusal
    cfg.write_text("lr: 1e-4\nmax_steps: 1\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", "--teacher", tiny_sd_dir, "--out", out, "--config", cfg,
                            *[a for a in DISTILL if a not in ("--lr", "1e-3")]], capsys)
    lrs = [json.loads(line)["lr"] for line in (out / "logs" / "log.jsonl").read_text().splitlines()]
    ok = code == 0 and lrs == [pytest.approx(1e-4)]
    record("bad_argument", "--config YAML: lr: 1e-4 read as the number it is", ok)
    assert ok, (err, lrs)


# --------------------------------------------------------------------------------------------------------------
# 10. output paths
# --------------------------------------------------------------------------------------------------------------

def test_output_paths_follow_no_dangling_link_and_replace_no_folder(tiny_lcm_dir, tiny_sd_dir, tmp_path, capsys):
    target = tmp_path / "nowhere" / "run"
    link = tmp_path / "link"
    link.symlink_to(target)
    code, _, err = run_cli(_distill(tiny_sd_dir, link, "--max-steps", "1"), capsys)
    ok = one_line_error(code, err) and "link" in err and not (tmp_path / "nowhere").exists()
    record("disk", "distill --out is a dangling link: refused, its target not created", ok)
    assert ok, err

    png_link = tmp_path / "x.png"
    png_link.symlink_to(tmp_path / "elsewhere" / "x.png")
    code, _, err = run_cli(["generate", tiny_lcm_dir, "--prompt", "x", "--out", png_link, "--steps", "1",
                            "--overwrite"], capsys)
    ok = one_line_error(code, err) and "link" in err and not (tmp_path / "elsewhere").exists()
    record("disk", "generate --out is a dangling link: refused, its target not created", ok)
    assert ok, err

    folder = tmp_path / "y.png"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = run_cli(["generate", tiny_lcm_dir, "--prompt", "x", "--out", folder, "--steps", "1",
                            "--overwrite"], capsys)
    ok = one_line_error(code, err) and "not a file" in err and (folder / "keep.txt").read_text() == "mine"
    record("disk", "generate --out x.png --overwrite where x.png is a folder: one line, the folder kept", ok)
    assert ok, err


def _outside_checkpoint(out: Path, outside: Path, how: str) -> None:
    """A run folder whose checkpoint (or cache) is reached through a link leading out of it."""
    real = outside / "step-0000005"
    real.mkdir(parents=True)
    (real / STATE_FILE).write_bytes(b"not even a checkpoint")
    if how == "checkpoints/step-N links outside":
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "step-0000005").symlink_to(real, target_is_directory=True)
    elif how == "checkpoints/ links outside":
        out.mkdir(parents=True)
        (out / "checkpoints").symlink_to(outside, target_is_directory=True)
    elif how == "training_state.pt links outside":
        (out / "checkpoints" / "step-0000005").mkdir(parents=True)
        (out / "checkpoints" / "step-0000005" / STATE_FILE).symlink_to(real / STATE_FILE)
    elif how == "cache/ links outside":
        out.mkdir(parents=True)
        (out / "cache").symlink_to(outside, target_is_directory=True)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["checkpoints/step-N links outside", "checkpoints/ links outside",
                                 "training_state.pt links outside", "cache/ links outside"])
def test_resume_follows_no_link_out_of_the_run_folder(how, tiny_sd_dir, tmp_path, capsys):
    out, outside = tmp_path / "teacher-run", tmp_path / "outside"
    _outside_checkpoint(out, outside, how)
    before = tree(outside)
    code, _, err = run_cli(["world", "train-teacher", "--out", out, "--resume", "--threads", "1", "--no-progress",
                            "--num-images", "8", "--vae-steps", "1"], capsys)
    ok = one_line_error(code, err) and "outside the run folder" in err and tree(outside) == before
    record("untrusted_file", f"world train-teacher --resume: {how}: refused, not followed", ok)
    assert ok, err
    if how != "cache/ links outside":  # the same for a distillation's --resume
        run = tmp_path / "distill-run"
        _outside_checkpoint(run, tmp_path / "outside2", how)
        code, _, err = run_cli(_distill(tiny_sd_dir, run, "--max-steps", "1", "--resume"), capsys)
        ok = one_line_error(code, err) and "outside the run folder" in err
        record("untrusted_file", f"distill --resume: {how}: refused, not followed", ok)
        assert ok, err


def test_train_teacher_resume_never_follows_a_latest_json(tmp_path, capsys):
    """lcmkit 0.1's teacher runs pointed at their checkpoint with checkpoints/latest.json; one that points out of
    the run folder is refused in one line and its target is never read."""
    out, outside = tmp_path / "teacher-run", tmp_path / "outside"
    outside.mkdir()
    (outside / STATE_FILE).write_bytes(b"not even a checkpoint")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"path": str(outside), "step": 5}))
    before = tree(outside)
    code, _, err = run_cli(["world", "train-teacher", "--out", out, "--resume", "--threads", "1", "--no-progress",
                            "--num-images", "8", "--vae-steps", "1"], capsys)
    ok = one_line_error(code, err) and "latest.json" in err and tree(outside) == before
    record("untrusted_file", "world train-teacher --resume: a latest.json pointing outside: refused, not followed", ok)
    assert ok, err
