"""Who can read what lcmkit writes: every file and folder gets the mode a plain ``open()`` / ``mkdir()`` gives under
the umask (0644 / 0755 under 022), not the private 0600 / 0700 that safetensors' ``save_file`` and
``tempfile.mkdtemp`` create, which a ComfyUI server running as another user could not read (issue 19, item 1).

Set in one place, :mod:`lcmkit.atomic` (``atomic_write``, ``atomic_folder``), which every output goes through; checked
here through the commands: ``lcmkit convert`` both ways, ``lcmkit lora combine``, ``lcmkit distill --mode full``
(its pipeline folder and its checkpoint), and under another umask.
"""

from __future__ import annotations

import os
import stat

import pytest
import tiny
import torch
from safetensors.torch import save_file

from lcmkit.atomic import atomic_folder, atomic_write
from lcmkit.cli import main
from lcmkit.lora_formats import LoraLayer, save_lora
from lcmkit.pipelines import load_pipeline

torch.set_num_threads(1)

TRAIN = ["--data", "world", "--batch-size", "2", "--generated-samples", "4", "--resolution", "32", "--max-steps", "1",
         "--warmup-steps", "0", "--validate-every", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture
def umask():
    """Set the process umask for one test (022 unless the test sets another), restored after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def modes(root) -> dict[str, int]:
    """{path relative to ``root`` ("." for itself): permission bits} of ``root`` and everything inside it."""
    found = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for p in root.rglob("*"):
        found[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return found


def assert_readable_tree(root, file_mode=0o644, dir_mode=0o755) -> None:
    wrong = {k: oct(m) for k, m in modes(root).items()
             if m != (dir_mode if (root / k).is_dir() else file_mode)}
    assert not wrong, wrong
    assert any(p.suffix == ".safetensors" for p in root.rglob("*"))  # safetensors' own files were among them


def test_convert_writes_readable_files_both_ways(tiny_sd_dir, tmp_path, umask, capsys):
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(tiny_sd_dir), "--out", str(single)]) == 0
    assert stat.S_IMODE(os.stat(single).st_mode) == 0o644
    assert main(["convert", str(single), "--model-config", str(tiny_sd_dir), "--out", str(tmp_path / "back")]) == 0
    assert_readable_tree(tmp_path / "back")
    assert main(["convert", str(tiny_sd_dir), "--out", str(single), "--overwrite", "--save-dtype", "fp16"]) == 0
    assert stat.S_IMODE(os.stat(single).st_mode) == 0o644  # a replaced file too


def test_lora_combine_writes_a_readable_pipeline_folder(tiny_sd_dir, tmp_path, umask):
    lora = tiny.tiny_lora_file(load_pipeline(tiny_sd_dir, device="cpu").unet, tmp_path / "l.safetensors")
    os.chmod(lora, 0o600)  # the input's mode is not the output's
    out = tmp_path / "combined"
    assert main(["lora", "combine", str(tiny_sd_dir), "--lora", f"{lora}:0.5", "--out", str(out)]) == 0
    assert_readable_tree(out)
    assert {"unet", "vae", "text_encoder", "lcmkit_lora_combine.json"} <= set(modes(out))


def test_full_distill_writes_a_readable_pipeline_and_checkpoint(tiny_sd_dir, tmp_path, umask):
    """The full-mode pipeline folder (shared by distill, finetune and refine: atomic_folder + save_pretrained) and
    lcmkit's own checkpoint follow the umask like the run's logs and config always did."""
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_sd_dir), "--mode", "full", "--out", str(run), *TRAIN]) == 0
    assert_readable_tree(run / "pipeline")
    assert_readable_tree(run / "checkpoints")
    assert type(load_pipeline(run / "pipeline", device="cpu")).__name__ == "LatentConsistencyModelPipeline"


def test_the_modes_follow_another_umask(tmp_path, umask):
    """Under umask 027 files are 0640 and folders 0750 (the umask decides, lcmkit only undoes the private modes);
    a file with an execute bit keeps one, as ``open`` + ``chmod +x`` under that umask would leave it."""
    umask(0o027)
    tensors = {"a": torch.zeros(2)}
    one = atomic_write(tmp_path / "one.safetensors", lambda tmp: save_file(tensors, str(tmp)))

    def write(folder):
        (folder / "sub").mkdir(mode=0o700)
        save_file(tensors, str(folder / "sub" / "w.safetensors"))
        (folder / "run.sh").write_text("true\n")
        os.chmod(folder / "run.sh", 0o700)

    tree = atomic_folder(tmp_path / "tree", write)
    lora = save_lora({"unet.conv_in": LoraLayer(torch.zeros(1, 4, 3, 3), torch.zeros(4, 1, 1, 1), 1.0)},
                     tmp_path / "lora.safetensors")
    assert stat.S_IMODE(os.stat(one).st_mode) == stat.S_IMODE(os.stat(lora).st_mode) == 0o640
    assert modes(tree) == {".": 0o750, "sub": 0o750, "sub/w.safetensors": 0o640, "run.sh": 0o750}
