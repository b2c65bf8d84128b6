"""Single-file checkpoints of SD 2.x and SDXL, end to end (tests/core/test_single_file.py does SD 1.x).

Tiny random pipelines written by ``lcmkit convert`` and taken back wherever lcmkit takes a model:

- SD 2.x (:func:`tiny.tiny_sd2`: a 1024-wide text encoder written in open_clip's layout under
  ``cond_stage_model.model.``, linear attention projections, v prediction): read back by lcmkit and by diffusers'
  ``from_single_file`` as the same tensors, ``lcmkit generate`` gives the folder's image (so the v-prediction
  scheduler came along), and ``distill --teacher FILE`` trains exactly the LoRA the folder teacher does.
- SDXL: ``distill --teacher FILE``, ``lora combine FILE`` and ``finetune --model FILE --lora …`` each give exactly
  what the same command gives on the diffusers folder.

All with ``--model-config`` the tiny folder: lcmkit's shipped sd21 / sd21-base / sdxl configs are full size (tested on
the meta device in test_single_file.py), so a tiny file cannot use them.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from safetensors.torch import load_file

from lcmkit.cli import main
from lcmkit.pipelines import load_pipeline
from lcmkit.single_file import inspect_file, load_single_file, resolve_config
from lcmkit.single_file_export import write_single_file

torch.set_num_threads(1)

TRAIN = ["--data", "world", "--batch-size", "2", "--generated-samples", "4", "--resolution", "32", "--max-steps", "1",
         "--warmup-steps", "0", "--validate-every", "0", "--no-progress", "--device", "cpu"]


def _cli(args, capsys):
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd2")
    tiny.tiny_sd2(folder)
    return folder


@pytest.fixture(scope="module")
def files(sd2_dir, tiny_sdxl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_families")
    made = {"sd2": out / "sd2.safetensors", "sdxl": out / "sdxl.safetensors"}
    for name, folder in (("sd2", sd2_dir), ("sdxl", tiny_sdxl_dir)):
        assert main(["convert", str(folder), "--out", str(made[name])]) == 0
    return made


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ma, mb = getattr(a, name, None), getattr(b, name, None)
        assert (ma is None) == (mb is None), name
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def _same_tensors(a, b) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys() and sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------------------
# SD 2.x
# --------------------------------------------------------------------------------------------------------------

def test_sd2_file_is_openclip_v_prediction_and_loads_back(files, sd2_dir):
    keys = load_file(str(files["sd2"])).keys()
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys  # q, k, v stacked
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)  # no CLIP ViT-L (SD 1.x) names
    info = inspect_file(files["sd2"])
    assert info["family"] == "sd2" and info["prediction"] == "v_prediction" and not info["full_lcm"]
    assert info["metadata"]["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    pipe, back = load_pipeline(sd2_dir, device="cpu"), load_single_file(files["sd2"], config=sd2_dir)
    assert type(back) is type(pipe) and back.scheduler.config.prediction_type == "v_prediction"
    assert back.unet.config.use_linear_projection and back.unet.config.cross_attention_dim == 1024
    _same_weights(pipe, back)


def test_diffusers_own_loader_reads_the_sd2_file(files, sd2_dir):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_single_file(str(files["sd2"]), config=str(sd2_dir), local_files_only=True,
                                                      safety_checker=None)
    _same_weights(load_pipeline(sd2_dir, device="cpu"), theirs)


def test_sd2_base_epsilon_file_names_its_config(tmp_path):
    """An epsilon SD 2.x file says so (ModelSpec ``stable-diffusion-v2-512``), and lcmkit then picks sd21-base."""
    path = write_single_file(tiny.tiny_sd2(prediction_type="epsilon"), tmp_path / "base.safetensors")
    info = inspect_file(path)
    assert info["family"] == "sd2" and info["prediction"] == "epsilon"
    assert info["metadata"]["modelspec.architecture"] == "stable-diffusion-v2-512"
    assert resolve_config(info, None, "base")[0].name == "sd21-base"


def test_generate_from_the_sd2_file_gives_the_folders_image(files, sd2_dir, tmp_path, capsys):
    args = ["--prompt", "a red circle", "--steps", "2", "--seed", "5", "--height", "64", "--width", "64"]
    assert _cli(["generate", sd2_dir, "--out", tmp_path / "a.png", *args], capsys)[0] == 0
    code, out = _cli(["generate", files["sd2"], "--model-config", sd2_dir, "--out", tmp_path / "b.png", *args], capsys)
    assert code == 0, out.err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def _distill(teacher, out, capsys, *config):
    code, res = _cli(["distill", "--teacher", teacher, *config, "--mode", "lora", "--lora-rank", "4",
                      "--lora-format", "diffusers", "--out", out, *TRAIN], capsys)
    assert code == 0, res.err
    return out / "lora" / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_distill_from_the_file_teacher_trains_the_folders_lora(kind, files, request, tmp_path, capsys):
    folder = request.getfixturevalue("sd2_dir" if kind == "sd2" else "tiny_sdxl_dir")
    ours = _distill(files[kind], tmp_path / "file", capsys, "--model-config", folder)
    _same_tensors(_distill(folder, tmp_path / "folder", capsys), ours)


# --------------------------------------------------------------------------------------------------------------
# SDXL as the base of lora combine and finetune
# --------------------------------------------------------------------------------------------------------------

def test_lora_combine_on_the_sdxl_file(files, tiny_sdxl_dir, tmp_path, capsys):
    lora = tiny.tiny_lora_file(load_pipeline(tiny_sdxl_dir, device="cpu").unet, tmp_path / "l.safetensors")
    for base, dst in ((tiny_sdxl_dir, "m1"), (files["sdxl"], "m2")):
        code, out = _cli(["lora", "combine", base, "--model-config", tiny_sdxl_dir, "--lora", f"{lora}:0.7",
                          "--out", tmp_path / dst], capsys)
        assert code == 0, out.err
    merged = load_pipeline(tmp_path / "m2", device="cpu")
    assert type(merged).__name__ == "StableDiffusionXLPipeline"
    _same_weights(load_pipeline(tmp_path / "m1", device="cpu"), merged)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = load_pipeline(tiny_sdxl_dir, device="cpu").unet.state_dict()[key]
    assert not torch.equal(merged.unet.state_dict()[key], base)  # it merged


def test_finetune_an_lcm_lora_on_the_sdxl_file(files, tiny_sdxl_dir, tmp_path, capsys):
    lora = tiny.tiny_lora_file(load_pipeline(tiny_sdxl_dir, device="cpu").unet, tmp_path / "lcm.safetensors",
                               scale=0.05)
    written = {}
    for base, dst in ((tiny_sdxl_dir, "f1"), (files["sdxl"], "f2")):
        code, out = _cli(["finetune", "--model", base, "--model-config", tiny_sdxl_dir, "--lora", lora,
                          "--lora-format", "diffusers", "--out", tmp_path / dst, *TRAIN], capsys)
        assert code == 0, out.err
        written[dst] = tmp_path / dst / "lora" / "lcm.safetensors"
    _same_tensors(written["f1"], written["f2"])
    before, after = load_file(str(lora)), load_file(str(written["f2"]))
    assert before.keys() == after.keys() and not all(torch.equal(before[k], after[k]) for k in before)  # it trained
