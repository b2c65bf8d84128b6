"""The LoRA files lcmkit writes, checked against how ComfyUI, Forge, AUTOMATIC1111 and kohya's sd-scripts map LoRA
keys onto a model (their rules as facts, docs/lora-formats.md), on SD 1.5 and SDXL UNets (random, on the meta device:
only names and shapes matter) and on tiny real ones.

The reference for "a weight of the original checkpoint" is diffusers' own original → diffusers converter
(``convert_ldm_unet_checkpoint``): :func:`lcmkit.lora_sgm.original_names` must invert it exactly, so the original
state dict it names is the one a single-file SD 1.5 / SDXL checkpoint has. Each client rule below then takes every
key of a written file to an original weight: a key that lands nowhere is a layer the client drops.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import tiny
import torch
from safetensors import safe_open

from lcmkit.lora import LCM_LORA_TARGETS, lcm_lora_config, lora_layers
from lcmkit.lora_export import kohya_bases, output_paths, write_lora_files
from lcmkit.lora_formats import LoraLayer, load_lora, to_state_dict
from lcmkit.lora_sgm import original_names
from lcmkit.task_arithmetic import attach_loras
from lcmkit_world.bench.configs import SD15, SDXL, build_unet

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------------
# the models: SD 1.5 / SDXL UNets on the meta device, LCM-LoRA over them
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch(request):
    """(name, meta UNet, its original names, the LCM-LoRA layers as LoraWeights of placeholder tensors)."""
    spec = {"sd15": SD15, "sdxl": SDXL}[request.param]
    unet = build_unet(spec, device="meta")
    names = original_names(unet)
    adapted = build_unet(spec, device="meta").requires_grad_(False)
    adapted.add_adapter(lcm_lora_config("sdxl" if spec.sdxl else "sd"))
    empty = torch.empty(1, 1, device="meta")
    weights = {f"unet.{p}": LoraLayer(empty, empty, 64.0) for p in lora_layers(adapted)}
    return request.param, unet, names, weights


def original_state_keys(unet, names) -> set[str]:
    """The original checkpoint's UNet weight keys (``diffusion_model.<original name>.weight``)."""
    return {f"diffusion_model.{names[m]}.weight" for m, mod in unet.named_modules()
            if m in names and isinstance(getattr(mod, "weight", None), torch.Tensor)}


def test_original_names_invert_diffusers_own_converter(arch):
    """Renamed by lcmkit's map, the UNet's state dict converts back (diffusers, original → diffusers) to itself."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, unet, names, _ = arch
    state = unet.state_dict()
    original = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        original[f"model.diffusion_model.{names[module]}.{param}"] = tensor
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)  # each tensor lands on its own name, none swapped


def test_the_tiny_unets_map_too():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for pipe in (tiny.tiny_sd(), tiny.tiny_sdxl()):
        names, state = original_names(pipe.unet), pipe.unet.state_dict()
        original = {f"model.diffusion_model.{names[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v
                    for k, v in state.items()}
        assert convert_ldm_unet_checkpoint(original, dict(pipe.unet.config)).keys() == state.keys()


# --------------------------------------------------------------------------------------------------------------
# the clients' rules (facts from their loaders; each returns {file key: original weight key or None})
# --------------------------------------------------------------------------------------------------------------

#: ComfyUI comfy/utils.py unet_to_diffusers: the diffusers names it maps to original ones
_COMFY_DIFFUSERS = re.compile(
    r"^(?:(?:down_blocks|up_blocks)\.\d+\.|mid_block\.)(?:"
    r"resnets\.\d+\.(?:norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)"
    r"|attentions\.\d+\.(?:proj_in|proj_out|norm)"
    r"|attentions\.\d+\.transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
    r"|(?:down|up)samplers\.0\.conv)$"
    r"|^(?:conv_in|conv_out|conv_norm_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]"
    r"|class_embedding\.linear_[12])$")
#: ComfyUI comfy/lora.py load_lora: the suffixes it reads after a mapped name
_COMFY_SUFFIXES = (".alpha", ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight",
                   "_lora.down.weight", ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight",
                   ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")


def comfyui_key_map(unet, names) -> dict[str, str]:
    """ComfyUI's model_lora_keys_unet (Forge's packages_3rdparty/comfyui_lora_collection is the same)."""
    key_map = {}
    for weight in original_state_keys(unet, names):  # the model's own (original) state dict
        path = weight[len("diffusion_model."):-len(".weight")]
        key_map["lora_unet_" + path.replace(".", "_")] = weight
        key_map["diffusion_model." + path] = weight
    for module, original in names.items():  # unet_to_diffusers
        if not _COMFY_DIFFUSERS.match(module):
            continue
        weight = f"diffusion_model.{original}.weight"
        key_map["lora_unet_" + module.replace(".", "_")] = weight
        for prefix in ("", "unet."):
            key = prefix + module.replace(".to_", ".processor.to_")
            key_map[key[:-2] if key.endswith(".to_out.0") else key] = weight
    return key_map


def comfyui(keys, unet, names) -> dict[str, str | None]:
    key_map = comfyui_key_map(unet, names)
    out = {}
    for key in keys:
        out[key] = next((key_map[key[:-len(s)]] for s in _COMFY_SUFFIXES
                         if key.endswith(s) and key[:-len(s)] in key_map), None)
    return out


def forge(keys, unet, names) -> dict[str, str | None]:
    """ComfyUI's map; more than 12 unmatched keys and Forge applies none of the file (sd_forge_lora/networks.py)."""
    out = comfyui(keys, unet, names)
    if sum(v is None for v in out.values()) > 12:
        return dict.fromkeys(out)
    return out


def _a1111_compvis(key: str) -> str:
    """AUTOMATIC1111 extensions-builtin/Lora convert_diffusers_name_to_compvis (UNet rules)."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
              "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
    if m := re.match(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = resnet.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = resnet.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = resnet.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    return key


def a1111(keys, unet, names) -> dict[str, str | None]:
    """AUTOMATIC1111 networks.py load_network: the key split at its first "." (name, LoRA part), the name converted,
    looked up among the model's modules (``diffusion_model_…``), then with ``lora_unet`` → ``diffusion_model``."""
    modules = {"diffusion_model_" + o.replace(".", "_"): f"diffusion_model.{o}.weight" for o in names.values()}
    parts = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha")  # network_lora's keys
    out = {}
    for key in keys:
        name, _, part = key.partition(".")
        found = modules.get(_a1111_compvis(name))
        if found is None and "lora_unet" in name:
            found = modules.get(name.replace("lora_unet", "diffusion_model"))
        out[key] = found if part in parts else None
    return out


def sd_scripts(keys, unet, names, sdxl: bool) -> dict[str, str | None]:
    """kohya sd-scripts networks/lora.py: LoRA modules are the Linear/Conv2d inside Transformer2DModel,
    ResnetBlock2D, Downsample2D, Upsample2D of its UNet, named ``lora_unet_`` + path with "_" (SD 1.x/2.x: diffusers
    paths, library/original_unet.py; SDXL: SGM paths, library/sdxl_original_unet.py); other keys load nowhere."""
    targets = {}
    for path, module in unet.named_modules():
        if type(module).__name__ in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            for child, leaf in module.named_modules():
                if child and type(leaf).__name__ in ("Linear", "Conv2d"):
                    full = f"{path}.{child}"
                    targets["lora_unet_" + (names[full] if sdxl else full).replace(".", "_")] = \
                        f"diffusion_model.{names[full]}.weight"
    out = {}
    for key in keys:
        name, _, part = key.partition(".")
        out[key] = targets.get(name) if part in ("lora_up.weight", "lora_down.weight", "alpha") else None
    return out


def clients(sdxl: bool):
    return {"ComfyUI": comfyui, "Forge": forge, "AUTOMATIC1111": a1111,
            "sd-scripts": lambda k, u, n: sd_scripts(k, u, n, sdxl)}


def layer_of(key: str) -> str:
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix):
            return key[:-len(suffix)]
    raise AssertionError(key)


def loaded_layers(resolved: dict[str, str | None]) -> int:
    """Layers a client applies: those whose down and up weights both land on a weight."""
    found: dict[str, set] = {}
    for key, target in resolved.items():
        if target is not None and not key.endswith(".alpha"):
            found.setdefault(layer_of(key), set()).add(target)
    return sum(len(t) == 1 for t in found.values())


# --------------------------------------------------------------------------------------------------------------
# the files
# --------------------------------------------------------------------------------------------------------------

def test_the_kohya_file_loads_whole_in_every_client(arch):
    """Every key of the kohya file lcmkit writes lands on the original weight of its own layer, in every client:
    none left over, none shared, every layer's alpha beside it."""
    name, unet, names, weights = arch
    sdxl = name == "sdxl"
    keys = list(to_state_dict(weights, "kohya", kohya_bases(weights, unet))[0])
    want = {f"diffusion_model.{names[n.split('.', 1)[1]]}.weight" for n in weights}
    assert len(want) == len(weights) == {"sd15": 278, "sdxl": 788}[name]
    assert want <= original_state_keys(unet, names)
    if sdxl:  # sd-scripts converts SDXL files holding diffusers block names (substring rules); this one holds none
        assert not any(re.search(r"down_blocks|up_blocks|mid_block", k) for k in keys)
    for client, rule in clients(sdxl).items():
        resolved = rule(keys, unet, names)
        dropped = [k for k, v in resolved.items() if v is None]
        assert not dropped, (client, dropped[:3])
        by_layer: dict[str, set] = {}
        for key, target in resolved.items():
            by_layer.setdefault(layer_of(key), set()).add(target)
        assert all(len(t) == 1 for t in by_layer.values()), client  # down, up and alpha: one weight
        assert {t for ts in by_layer.values() for t in ts} == want, client  # each layer its own weight
        assert all(f"{layer}.alpha" in resolved for layer in by_layer)


#: layers each client applies from the diffusers-keyed file (ComfyUI/Forge drop every to_q/to_k/to_v/to_out.0 and
#: Forge then all of it, AUTOMATIC1111 splits keys at the first "." and sd-scripts knows no such names)
DIFFUSERS_FILE_LOADS = {"sd15": {"ComfyUI": 150, "Forge": 0, "AUTOMATIC1111": 0, "sd-scripts": 0},
                        "sdxl": {"ComfyUI": 228, "Forge": 0, "AUTOMATIC1111": 0, "sd-scripts": 0}}


def test_what_each_client_makes_of_the_other_files(arch, capsys):
    """The measured counts (docs/lora-formats.md): the diffusers file loses layers everywhere, and an SDXL kohya
    file with diffusers block names loses ``up_blocks.0.upsamplers.0.conv`` in AUTOMATIC1111."""
    name, unet, names, weights = arch
    sdxl = name == "sdxl"
    diffusers_keys = list(to_state_dict(weights, "diffusers")[0])
    counts = {c: loaded_layers(rule(diffusers_keys, unet, names)) for c, rule in clients(sdxl).items()}
    with capsys.disabled():
        print(f"\n{name}: diffusers-keyed LCM-LoRA, layers applied of {len(weights)}: {counts}")
    assert counts == DIFFUSERS_FILE_LOADS[name]
    plain_kohya = list(to_state_dict(weights, "kohya")[0])  # diffusers block names for every architecture
    resolved = a1111(plain_kohya, unet, names)
    lost = sorted({layer_of(k) for k, v in resolved.items() if v is None})
    with capsys.disabled():
        print(f"{name}: kohya keys with diffusers block names, AUTOMATIC1111 drops {lost}")
    assert lost == (["lora_unet_up_blocks_0_upsamplers_0_conv"] if sdxl else [])
    assert loaded_layers(comfyui(plain_kohya, unet, names)) == len(weights)  # ComfyUI maps either naming


# --------------------------------------------------------------------------------------------------------------
# real files from the writer (tiny models): formats, dtype, alpha, permissions, round trip
# --------------------------------------------------------------------------------------------------------------

def _random_weights(unet, seed=0):
    """A LoRA on every LCM-LoRA target of ``unet`` with rank 2 and alpha 3 (≠ rank: a lost alpha shows)."""
    adapted = copy.deepcopy(unet).requires_grad_(False)
    adapted.add_adapter(lcm_lora_config("sd"))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for path in lora_layers(adapted):
        module = unet.get_submodule(path)
        if isinstance(module, torch.nn.Conv2d):
            down, up = (2, module.in_channels, *module.kernel_size), (module.out_channels, 2, 1, 1)
        else:
            down, up = (2, module.in_features), (module.out_features, 2)
        weights[f"unet.{path}"] = LoraLayer(torch.randn(down, generator=gen), 0.05 * torch.randn(up, generator=gen),
                                            3.0)
    return weights


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_written_files_every_client_and_diffusers(kind, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = tiny.tiny_sdxl() if kind == "sdxl" else tiny.tiny_sd()
    unet, names = pipe.unet, original_names(pipe.unet)
    weights = _random_weights(unet)
    assert {n.split(".", 1)[1].rsplit(".", 1)[-1] for n in weights} >= {"to_q", "conv1", "conv_shortcut"}
    files = write_lora_files(weights, tmp_path / "pytorch_lora_weights.safetensors", "kohya,diffusers", unet, "fp16")
    assert files == {"kohya": tmp_path / "pytorch_lora_weights_kohya.safetensors",
                     "diffusers": tmp_path / "pytorch_lora_weights.safetensors"}
    mask = os.umask(0o022)
    os.umask(mask)
    for path in files.values():
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not safetensors' private 0600
    with safe_open(str(files["kohya"]), framework="pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys if not k.endswith(".alpha")} == {torch.float16}
        assert all(f.get_tensor(k).dtype == torch.float32 and float(f.get_tensor(k)) == 3.0
                   for k in keys if k.endswith(".alpha"))  # alpha as the clients read it: a per-layer tensor
    if kind == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    for client, rule in clients(kind == "sdxl").items():
        if client == "AUTOMATIC1111" and kind == "sd":
            continue  # its SD 1.x rule counts SD 1.x's two layers per block; the tiny UNet has one (meta tests above)
        assert loaded_layers(rule(keys, unet, names)) == len(weights), client
    for path in files.values():  # lcmkit reads both back as the same LoRA (fp16 factors)
        back = load_lora(path, unet)
        assert back.keys() == weights.keys()
        for n, layer in weights.items():
            assert back[n].alpha == 3.0 and torch.equal(back[n].down.float(), layer.down.half().float())
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    hooked = tiny.tiny_sdxl() if kind == "sdxl" else tiny.tiny_sd()
    rounded = {n: LoraLayer(w.down.half().float(), w.up.half().float(), w.alpha) for n, w in weights.items()}
    with attach_loras({"unet": hooked.unet}, [(rounded, 1.0)]):
        want = _forward(hooked.unet)
    assert (want - _forward(hooked.unet)).abs().max() > 0.1  # the LoRA changes the output
    for path in files.values():  # diffusers applies every layer of either file, with alpha / rank
        fresh = tiny.tiny_sdxl() if kind == "sdxl" else tiny.tiny_sd()
        assert isinstance(fresh, cls)
        fresh.load_lora_weights(str(path.parent), weight_name=path.name)
        assert len(lora_layers(fresh.unet)) == len(weights), path.name
        assert (_forward(fresh.unet) - want).abs().max() < 1e-4, path.name


def _forward(unet) -> torch.Tensor:
    """One UNet forward on fixed inputs (SDXL's added conditioning included)."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                      "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, t, ctx, **extra).sample


def test_output_paths_and_format_names():
    from lcmkit.errors import LcmkitError
    from lcmkit.lora_export import parse_formats

    assert output_paths("a/b.safetensors", "kohya") == {"kohya": Path("a/b.safetensors")}
    assert list(output_paths("b.safetensors", "peft,kohya").values())[1].name == "b_kohya.safetensors"
    assert parse_formats(" Kohya, diffusers,kohya ") == ("kohya", "diffusers")
    for bad in ("", "comfy", "kohya,sgm"):
        with pytest.raises(LcmkitError, match="lora_format"):
            parse_formats(bad)
    assert set(LCM_LORA_TARGETS["sdxl"]) == set(LCM_LORA_TARGETS["sd"])


# --------------------------------------------------------------------------------------------------------------
# the commands write them by default
# --------------------------------------------------------------------------------------------------------------

TRAIN = ["--data", "world", "--batch-size", "2", "--generated-samples", "4", "--resolution", "32", "--max-steps", "1",
         "--warmup-steps", "0", "--validate-every", "0", "--no-progress", "--device", "cpu"]


def test_the_commands_write_both_files_by_default(tiny_sd_dir, tmp_path, capsys):
    from lcmkit.cli import main

    mask = os.umask(0o022)
    os.umask(mask)
    base = tiny.tiny_sd().unet
    assert main(["distill", "--teacher", str(tiny_sd_dir), "--out", str(tmp_path / "d"), "--mode", "lora",
                 "--lora-rank", "4", "--lora-alpha", "8", "--validation-steps", "1", *TRAIN]) == 0
    folder = tmp_path / "d" / "lora"
    assert {p.name for p in folder.glob("*.safetensors")} == {"pytorch_lora_weights.safetensors",
                                                              "pytorch_lora_weights_kohya.safetensors"}
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~mask
    kohya = load_lora(folder / "pytorch_lora_weights_kohya.safetensors", base)
    assert len(kohya) == 79 and {w.alpha for w in kohya.values()} == {8.0}
    assert kohya.keys() == load_lora(folder / "pytorch_lora_weights.safetensors", base).keys()

    assert main(["finetune", "--model", str(tiny_sd_dir), "--lora", str(folder / "pytorch_lora_weights.safetensors"),
                 "--out", str(tmp_path / "f"), "--validation-steps", "1", *TRAIN]) == 0
    assert {p.name for p in (tmp_path / "f" / "lora").glob("*.safetensors")} == {
        "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"}

    out = tmp_path / "style.safetensors"
    assert main(["lora", "train", "--model", str(tiny_sd_dir), "--out", str(out), "--save-dtype", "fp16",
                 "--lora-targets", "attention", *TRAIN]) == 0
    kohya_file = tmp_path / "style_kohya.safetensors"
    assert out.is_file() and kohya_file.is_file()
    with safe_open(str(kohya_file), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.float16}

    assert main(["lora", "train", "--model", str(tiny_sd_dir), "--out", str(tmp_path / "only.safetensors"),
                 "--lora-format", "diffusers", "--lora-targets", "attention", *TRAIN]) == 0
    assert not (tmp_path / "only_kohya.safetensors").exists()
    capsys.readouterr()
