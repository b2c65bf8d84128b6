"""Single-file checkpoints (lcmkit.single_file, lcmkit.single_file_export, ``lcmkit convert``).

Round trips on tiny random SD 1.x / SDXL / LCM pipelines: written in the original layout and read back (by lcmkit
and by diffusers' own single-file loader) they give the same tensors and, through ``lcmkit generate``, the same
image as the diffusers folder. Full-size SD 1.5 / SD 2.1 / SDXL on the meta device: the exported names are exactly
what diffusers' converters expect, and lcmkit's shipped configs build the published architectures. Refusals: a
pickle, a pickle renamed .safetensors, files of other kinds, each in one line and without torch.load.
"""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from lcmkit.cli import main
from lcmkit.errors import LcmkitError
from lcmkit.pipelines import generate, load_pipeline
from lcmkit.single_file import (
    CONFIG_ROOT,
    _diffusers_guess,
    _Shape,
    _tokenizer,
    _unet,
    clip_bpe_file,
    clip_tokenizer_from_bpe,
    inspect_file,
    load_single_file,
    using_config,
)
from lcmkit.single_file_export import (
    clip_state,
    openclip_state,
    pipeline_state,
    unet_state,
    vae_state,
    write_single_file,
)

torch.set_num_threads(1)

PROMPT = "a red circle on a blue square"
GEN = dict(steps=2, seed=3, height=64, width=64, progress=False, output_type="np")


def _cli(args, capsys):
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def _one_line(err: str) -> bool:
    return len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def files(tiny_sd_dir, tiny_sdxl_dir, tiny_lcm_dir, tmp_path_factory):
    """The tiny folders written as single files by ``lcmkit convert`` (the LCM with its w-embedding kept)."""
    out = tmp_path_factory.mktemp("single")
    made = {}
    for name, folder, extra in (("sd", tiny_sd_dir, []), ("sdxl", tiny_sdxl_dir, []),
                                ("lcm", tiny_lcm_dir, ["--keep-w-embedding"])):
        made[name] = out / f"{name}.safetensors"
        assert main(["convert", str(folder), "--out", str(made[name]), *extra]) == 0
    return made


# --------------------------------------------------------------------------------------------------------------
# tiny round trips
# --------------------------------------------------------------------------------------------------------------

def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ma, mb = getattr(a, name, None), getattr(b, name, None)
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.parametrize("kind", ["sd", "sdxl", "lcm"])
def test_single_file_loads_back_to_the_same_pipeline(kind, files, request):
    folder = request.getfixturevalue(f"tiny_{kind}_dir")
    pipe, back = load_pipeline(folder, device="cpu"), load_single_file(files[kind], config=folder)
    assert type(back) is type(pipe)
    _same_weights(pipe, back)
    info = inspect_file(files[kind])
    assert info["family"] == ("sdxl" if kind == "sdxl" else "sd1") and info["full_lcm"] == (kind == "lcm")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_generate_from_the_file_gives_the_folders_image(kind, files, request, tmp_path, capsys):
    folder = request.getfixturevalue(f"tiny_{kind}_dir")
    args = ["--prompt", PROMPT, "--steps", "2", "--seed", "5", "--height", "64", "--width", "64", "--overwrite"]
    assert _cli(["generate", folder, "--out", tmp_path / "a.png", *args], capsys)[0] == 0
    code, out = _cli(["generate", files[kind], "--model-config", folder, "--out", tmp_path / "b.png", *args], capsys)
    assert code == 0, out.err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_diffusers_own_single_file_loader_reads_lcmkits_file(files, tiny_sd_dir, tiny_sdxl_dir):
    """The file is what diffusers' ``from_single_file`` loads: the same tensors as the folder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    theirs = StableDiffusionPipeline.from_single_file(str(files["sd"]), config=str(tiny_sd_dir),
                                                      local_files_only=True, safety_checker=None)
    _same_weights(load_pipeline(tiny_sd_dir, device="cpu"), theirs)
    xl = load_pipeline(tiny_sdxl_dir, device="cpu")
    for cls, name in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        model = cls.from_single_file(str(files["sdxl"]), config=str(tiny_sdxl_dir), subfolder=name,
                                     local_files_only=True)
        ours = getattr(xl, name).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items()) and len(ours) == len(
            model.state_dict())


def test_a_full_lcm_folded_at_one_guidance_scale(tiny_lcm_dir, files, tmp_path):
    """--guidance g folds the w-embedding into time_embed.0.bias: a plain UNet that, without CFG, gives the LCM's
    image at g; the kept embedding gives the LCM's image at every g."""
    lcm = load_pipeline(tiny_lcm_dir, device="cpu")
    folded = write_single_file(lcm, tmp_path / "folded.safetensors", guidance=8.0)
    assert "model.diffusion_model.time_embed.cond_proj.weight" not in load_file(str(folded))
    plain = load_single_file(folded, config=tiny_lcm_dir)
    assert plain.unet.config.time_cond_proj_dim is None
    reference = generate(lcm, PROMPT, guidance=8.0, **GEN)
    assert np.abs(generate(plain, PROMPT, guidance=1.0, **GEN) - reference).max() < 1e-4
    assert np.abs(generate(lcm, PROMPT, guidance=2.0, **GEN) - reference).max() > 1e-3  # g matters
    kept = load_single_file(files["lcm"], config=tiny_lcm_dir)
    assert np.array_equal(generate(kept, PROMPT, guidance=2.0, **GEN), generate(lcm, PROMPT, guidance=2.0, **GEN))


def test_convert_both_ways_and_lora_combine_on_a_file(files, tiny_sd_dir, tmp_path, capsys):
    code, out = _cli(["convert", files["sd"], "--model-config", tiny_sd_dir, "--out", tmp_path / "back"], capsys)
    assert code == 0, out.err
    _same_weights(load_pipeline(tiny_sd_dir, device="cpu"), load_pipeline(tmp_path / "back", device="cpu"))
    code, out = _cli(["convert", tiny_sd_dir, "--out", files["sd"]], capsys)  # exists, no --overwrite
    assert code == 2 and "already exists" in out.err and _one_line(out.err)
    lora = tiny.tiny_lora_file(load_pipeline(tiny_sd_dir, device="cpu").unet, tmp_path / "l.safetensors")
    for base, dst in ((tiny_sd_dir, "m1"), (files["sd"], "m2")):
        code, out = _cli(["lora", "combine", base, "--model-config", tiny_sd_dir, "--lora", f"{lora}:0.7",
                          "--out", tmp_path / dst], capsys)
        assert code == 0, out.err
    _same_weights(load_pipeline(tmp_path / "m1", device="cpu"), load_pipeline(tmp_path / "m2", device="cpu"))


def test_distill_takes_a_single_file_teacher(files, tiny_sd_dir, tmp_path, capsys):
    code, out = _cli(["distill", "--teacher", files["sd"], "--model-config", tiny_sd_dir, "--data", "world",
                      "--generated-samples", "4", "--max-steps", "1", "--batch-size", "2", "--resolution", "32",
                      "--validate-every", "0", "--mode", "lora", "--no-progress", "--out", tmp_path / "run"], capsys)
    assert code == 0, out.err
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_finetune_a_single_file_lcm_writes_a_pipeline_folder(files, tiny_lcm_dir, tmp_path, capsys):
    """The output pipeline is rebuilt from the input file (lcmkit.single_file.reload_pipeline)."""
    code, out = _cli(["finetune", "--model", files["lcm"], "--model-config", tiny_lcm_dir, "--data", "world",
                      "--generated-samples", "4", "--max-steps", "1", "--batch-size", "2", "--resolution", "32",
                      "--validate-every", "0", "--no-progress", "--out", tmp_path / "run"], capsys)
    assert code == 0, out.err
    result = load_pipeline(out.out.strip().splitlines()[-1], device="cpu")
    assert type(result).__name__ == "LatentConsistencyModelPipeline" and result.unet.config.time_cond_proj_dim == 256


# --------------------------------------------------------------------------------------------------------------
# refusals: one line each, nothing unpickled
# --------------------------------------------------------------------------------------------------------------

def _no_torch_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was reached")
    monkeypatch.setattr(torch, "load", refuse)


def test_pickles_refused_in_one_line(files, tmp_path, monkeypatch, capsys):
    _no_torch_load(monkeypatch)
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(files["sd"], ckpt)
    renamed = tmp_path / "model.safetensors"
    torch.save({"model.diffusion_model.x": torch.zeros(1)}, renamed)
    for path, words in ((ckpt, "pickle checkpoint (.ckpt)"), (renamed, "pickle / torch.save checkpoint despite")):
        code, out = _cli(["generate", path, "--prompt", "x", "--out", tmp_path / "a.png"], capsys)
        assert code == 2 and words in out.err and _one_line(out.err), out.err
        code, out = _cli(["distill", "--teacher", path, "--data", "world", "--out", tmp_path / "r"], capsys)
        assert code == 2 and words in out.err and _one_line(out.err), out.err


def _write(path, shapes: dict, metadata=None):
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("shapes, why", [
    ({"a.b": (2,)}, "no UNet in the original layout (model.diffusion_model.*); its keys start with a"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "it is a LoRA file"),
    ({"down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3)}, "diffusers-named UNet weights"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}, "reads it as a 'inpainting' checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 7, 3, 3)}, "takes 7 input channels"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3), "conditioner.embedders.0.model.ln_final.weight":
      (8,)}, "SDXL refiner"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}, "names no family"),
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, "'flux-schnell' checkpoint"),
])
def test_unrecognised_files_refused_naming_why(shapes, why, tmp_path, monkeypatch, capsys):
    _no_torch_load(monkeypatch)
    path = _write(tmp_path / "m.safetensors", shapes)
    with pytest.raises(LcmkitError) as e:
        inspect_file(path)
    assert why in str(e.value)
    code, out = _cli(["generate", path, "--prompt", "x", "--out", tmp_path / "a.png"], capsys)
    assert code == 2 and why in out.err and _one_line(out.err)


def test_a_config_of_another_family_is_refused(files, tiny_sdxl_dir, tmp_path, monkeypatch):
    with pytest.raises(LcmkitError, match="SD 1.x checkpoint but --model-config .* is SDXL"):
        load_single_file(files["sd"], config=tiny_sdxl_dir)
    monkeypatch.setattr("lcmkit.single_file.clip_bpe_file", lambda: None)
    with pytest.raises(LcmkitError, match="no CLIP tokenizer available offline"):  # before any weight is read
        load_single_file(files["sd"])
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress(b"version\na b\n"))
    monkeypatch.setattr("lcmkit.single_file.clip_bpe_file", lambda: bpe)
    with pytest.raises(LcmkitError, match="its UNet does not match lcmkit's sd15's config: .* weights missing"):
        load_single_file(files["sd"])  # the shipped SD 1.5 configs: a tiny UNet is not SD 1.5's


def test_prediction_type_from_metadata_else_sd21_default(tmp_path):
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "cond_stage_model.model.ln_final.weight":
            (8,)}
    plain = inspect_file(_write(tmp_path / "a.safetensors", unet))
    said = inspect_file(_write(tmp_path / "b.safetensors", unet, {"modelspec.prediction_type": "epsilon"}))
    from lcmkit.single_file import resolve_config

    assert plain["family"] == "sd2" and plain["prediction"] is None
    assert resolve_config(plain, None, "a")[0].name == "sd21" and resolve_config(said, None, "b")[0].name == "sd21-base"
    assert resolve_config(plain, "sd21-base", "a")[0].name == "sd21-base"  # the option wins


# --------------------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------------------

def test_clip_vocabulary_built_from_the_bpe_merges(tmp_path):
    """Token ids in CLIP's order: 256 bytes, 256 bytes + </w>, one per merge, then the two specials."""
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress("version line\na b\nab c</w>\n".encode()))
    tok = clip_tokenizer_from_bpe(bpe, pad_token="<|endoftext|>", max_length=8)
    assert tok("abc").input_ids == [514, 513, 515] and len(tok) == 516
    assert tok.convert_ids_to_tokens([512, 514]) == ["ab", "<|startoftext|>"]


@pytest.mark.skipif(clip_bpe_file() is None, reason="no installed package ships CLIP's BPE file")
def test_the_real_clip_vocabulary_gives_clips_ids():
    tok = clip_tokenizer_from_bpe(clip_bpe_file(), pad_token="!")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407] and tok.pad_token_id == 0


def test_no_tokenizer_offline_is_one_clear_line(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("lcmkit.single_file.clip_bpe_file", lambda: None)
    with pytest.raises(LcmkitError) as e:
        _tokenizer(tmp_path, "tokenizer", "sd1", "m.safetensors")
    assert "no CLIP tokenizer available offline" in str(e.value) and "--model-config DIR" in str(e.value)
    assert _tokenizer(tiny_sd_dir, "tokenizer", "sd1", "m")("ab").input_ids[0] == 0  # the folder's own


# --------------------------------------------------------------------------------------------------------------
# full-size architectures, names only (meta device)
# --------------------------------------------------------------------------------------------------------------

def _meta(kind: str):
    """Meta-device UNet, VAE and text encoder(s) built from lcmkit's shipped configs of ``kind``."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIG_ROOT / kind
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder), subfolder="vae"))
        encoders = {}
        for sub in ("text_encoder", "text_encoder_2"):
            if (folder / sub).is_dir():
                config = CLIPTextConfig.from_pretrained(str(folder), subfolder=sub)
                cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
                encoders[sub] = cls(config)
    return unet, vae, encoders


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind, guess, unet_params", [("sd15", "v1", 859_520_964), ("sd21", "v2", 865_910_724),
                                                      ("sdxl", "xl_base", 2_567_463_684)])
def test_full_size_names_invert_diffusers_converters(kind, guess, unet_params):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet, vae, encoders = _meta(kind)
    assert _count(unet) == unet_params and _count(vae) == 83_653_863  # the published architectures
    original = unet_state(unet)
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert back.keys() == unet.state_dict().keys()
    assert all(tuple(back[k].shape) == tuple(v.shape) for k, v in unet.state_dict().items())
    vae_back = convert_ldm_vae_checkpoint(vae_state(vae), dict(vae.config))
    assert vae_back.keys() == vae.state_dict().keys()
    assert all(tuple(vae_back[k].shape) == tuple(v.shape) for k, v in vae.state_dict().items())
    for sub, encoder in encoders.items():
        strip = (lambda s: {k.removeprefix("text_model."): v for k, v in s.items()}) \
            if not hasattr(encoder, "text_model") else (lambda s: s)
        if kind == "sd15" or sub == "text_encoder" and kind == "sdxl":
            prefix = "conditioner.embedders.0.transformer." if kind == "sdxl" else "cond_stage_model.transformer."
            state = clip_state(encoder, prefix)
            converted = strip(convert_ldm_clip_checkpoint(state))
        else:
            prefix = "cond_stage_model.model." if kind == "sd21" else "conditioner.embedders.1.model."
            state = openclip_state(encoder, prefix)
            converted = strip(convert_open_clip_checkpoint(encoder, state, prefix=prefix))
        expected = {k for k in encoder.state_dict() if not k.endswith("position_ids")}
        assert set(converted) == expected, (sub, set(converted) ^ expected)
        original.update(state)
    assert _diffusers_guess({k: _Shape(v.shape) for k, v in original.items()}) == guess
    # lcmkit's own reader builds the same UNet from the shipped configs and these names
    info = {"family": {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[kind]}
    rebuilt = _unet(original, CONFIG_ROOT / kind, info, "meta", f"lcmkit's {kind}")
    assert _count(rebuilt) == unet_params


def test_text_encoders_of_the_shipped_configs_have_the_published_sizes():
    _, _, sd15 = _meta("sd15")
    _, _, sdxl = _meta("sdxl")
    assert _count(sd15["text_encoder"]) == _count(sdxl["text_encoder"]) == 123_060_480
    assert _count(sdxl["text_encoder_2"]) == 694_659_840


def test_pipeline_state_names_every_weight_once(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir, device="cpu")
    state = pipeline_state(pipe)
    total = sum(len([k for k in getattr(pipe, n).state_dict() if not k.endswith("position_ids")])
                for n in ("unet", "vae", "text_encoder", "text_encoder_2"))
    # open_clip stacks q, k, v: three weights and three biases become two tensors per layer
    layers = pipe.text_encoder_2.config.num_hidden_layers
    assert len(state) == total - 4 * layers


def test_using_config_is_scoped(files, tiny_sd_dir):
    from lcmkit.single_file import _config

    with using_config(tiny_sd_dir):
        assert _config.get() == str(tiny_sd_dir)
        assert type(load_pipeline(files["sd"], device="cpu")).__name__ == "StableDiffusionPipeline"
    assert _config.get() is None
