"""Flow-transformer LoRAs lcmkit writes, in the clients that load them.

- diffusers: a FLUX transformer LoRA (diffusers file and comfyui file) loads whole in ``FluxPipeline.load_lora_weights``
  on a tiny random FLUX: every layer of the file adapted, alpha honoured, the output lcmkit's adapted transformer
  gives.
- ComfyUI: its rules for SD3 and FLUX LoRA keys (comfy/lora.py ``model_lora_keys_unet``: ``transformer.<diffusers
  name>`` through comfy/utils.py ``mmdit_to_diffusers`` / ``flux_to_diffusers``, which map diffusers names onto the
  original checkpoints' fused weights with row slices; ``load_lora`` reading ``<name>.lora_B.weight`` /
  ``.lora_A.weight`` / ``.alpha``) are written below as facts. They are checked against diffusers' own
  original → diffusers converters on the full-size SD3.5-medium, SD3.5-large and FLUX.1-dev layouts (meta device;
  each weight replaced by a column of distinct row ids, so a slice that lands on the wrong rows shows), and then
  every key of lcmkit's files must resolve through them.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from safetensors import safe_open

from lcmkit.errors import LcmkitError
from lcmkit.flux import latent_image_ids
from lcmkit.lora import adapter_weights, flow_lora_config, lora_layers
from lcmkit.lora_export import comfyui_state_dict, write_lora_files
from lcmkit.lora_formats import LoraLayer, to_state_dict
from lcmkit_world.bench import configs

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------------
# diffusers: FluxPipeline.load_lora_weights
# --------------------------------------------------------------------------------------------------------------

def _flux_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 24, 64, generator=g), timestep=torch.tensor([0.9, 0.25]),
                guidance=torch.tensor([3.5, 3.5]), encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), txt_ids=torch.zeros(7, 3),
                img_ids=latent_image_ids((8, 12)))


def _random_adapter(model, rank=4, alpha=6.0):
    model.add_adapter(flow_lora_config(model, rank=rank, alpha=alpha))  # scale 1.5: alpha must reach the client
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_flux_lora_written_by_lcmkit_loads_whole_in_fluxpipeline(tmp_path):
    transformer = _random_adapter(tiny.tiny_flux().transformer)
    ours = set(lora_layers(transformer))
    assert len(ours) == 17  # 12 in the double-stream block, 5 in the single-stream one (q, k, v, proj_mlp, proj_out)
    with torch.no_grad():
        expected = transformer(**_flux_inputs(), return_dict=False)[0]
        transformer.disable_adapters()
        base = transformer(**_flux_inputs(), return_dict=False)[0]
        transformer.enable_adapters()
    assert (expected - base).abs().max() > 1e-2

    written = write_lora_files(adapter_weights(transformer, component="transformer"),
                               tmp_path / "pytorch_lora_weights.safetensors", formats="diffusers,comfyui")
    for fmt, path in written.items():
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
        pairs = {k[:-len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight")}
        assert {k[:-len(".lora_B.weight")] for k in keys if k.endswith(".lora_B.weight")} == pairs
        assert len(pairs) == 17 and all(k.startswith("transformer.") for k in keys)
        assert sum(k.endswith(".alpha") for k in keys) == (17 if fmt == "comfyui" else 0)

        fresh = tiny.tiny_flux()  # same seed: the same base weights
        fresh.load_lora_weights(str(tmp_path), weight_name=path.name)
        loaded = set(lora_layers(fresh.transformer))
        assert loaded == ours and len(loaded) == len(pairs)  # every pair of the file applied, nothing else
        module = fresh.transformer.get_submodule("single_transformer_blocks.0.proj_mlp")
        assert list(module.scaling.values()) == [1.5]
        with torch.no_grad():
            got = fresh.transformer(**_flux_inputs(), return_dict=False)[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=fmt)


def test_sd3_takes_the_diffusers_file_and_refuses_alpha_tensors(tmp_path):
    """StableDiffusion3Pipeline refuses any key without "lora" in it, so the comfyui file (``….alpha``) is for
    ComfyUI and FLUX only; the diffusers file carries SD3's alpha in its header."""
    transformer = _random_adapter(tiny.tiny_sd3().transformer)
    written = write_lora_files(adapter_weights(transformer, component="transformer"),
                               tmp_path / "pytorch_lora_weights.safetensors", formats="comfyui")
    with pytest.raises(ValueError, match="lora"):
        tiny.tiny_sd3().load_lora_weights(str(tmp_path), weight_name=written["comfyui"].name)


def test_a_transformer_lora_has_no_kohya_file_and_is_refused_before_writing(tmp_path):
    weights = adapter_weights(_random_adapter(tiny.tiny_flux().transformer), component="transformer")
    with pytest.raises(LcmkitError, match="no kohya key convention for transformer"):
        write_lora_files(weights, tmp_path / "lora.safetensors", formats="diffusers,kohya")
    assert not list(tmp_path.iterdir())
    mixed = {**weights, "unet.conv_in": next(iter(weights.values()))}
    with pytest.raises(LcmkitError, match="no single file layout"):
        comfyui_state_dict(mixed)


def test_comfyui_format_of_a_unet_lora_is_the_kohya_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {"unet.down_blocks.0.attentions.0.proj_in": LoraLayer(torch.randn(4, 8, generator=g),
                                                                   torch.randn(16, 4, generator=g), 6.0)}
    written = write_lora_files(weights, tmp_path / "lora.safetensors", formats="kohya,comfyui")
    tensors = {}
    for fmt, path in written.items():
        with safe_open(path, "pt") as f:
            tensors[fmt] = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors["comfyui"].keys() == tensors["kohya"].keys()
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.alpha" in tensors["comfyui"]
    assert all(torch.equal(tensors["comfyui"][k], tensors["kohya"][k]) for k in tensors["kohya"])


# --------------------------------------------------------------------------------------------------------------
# ComfyUI: its key maps as facts (diffusers name -> original name, or (original name, (dim, first row, rows)))
# --------------------------------------------------------------------------------------------------------------

def _swap_scale_shift(w):
    shift, scale = w.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _both(key_map, diffusers, original):
    for end in ("weight", "bias"):
        key_map[f"{diffusers}.{end}"] = f"{original}.{end}"


def comfy_flux_map(config) -> dict:
    """comfy/utils.py ``flux_to_diffusers``: double blocks' q/k/v into ``img_attn.qkv`` / ``txt_attn.qkv`` rows
    (0, h, 2h; h each), single blocks' q/k/v and ``proj_mlp`` into ``linear1`` rows (0, h, 2h; then 3h, 4h rows),
    h = hidden size; the rest one to one."""
    h = config.num_attention_heads * config.attention_head_dim
    key_map = {}
    for i in range(config.num_layers):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for end in ("weight", "bias"):
            for j, p in enumerate("qkv"):
                key_map[f"{d}.attn.to_{p}.{end}"] = (f"{o}.img_attn.qkv.{end}", (0, j * h, h))
                key_map[f"{d}.attn.add_{p}_proj.{end}"] = (f"{o}.txt_attn.qkv.{end}", (0, j * h, h))
        for diffusers, original in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                                    ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                                    ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                                    ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            _both(key_map, f"{d}.{diffusers}", f"{o}.{original}")
        for diffusers, original in (("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                                    ("attn.norm_added_q", "txt_attn.norm.query_norm"),
                                    ("attn.norm_added_k", "txt_attn.norm.key_norm")):
            key_map[f"{d}.{diffusers}.weight"] = f"{o}.{original}.scale"
    for i in range(config.num_single_layers):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for end in ("weight", "bias"):
            for j, p in enumerate("qkv"):
                key_map[f"{d}.attn.to_{p}.{end}"] = (f"{o}.linear1.{end}", (0, j * h, h))
            key_map[f"{d}.proj_mlp.{end}"] = (f"{o}.linear1.{end}", (0, 3 * h, 4 * h))
        _both(key_map, f"{d}.norm.linear", f"{o}.modulation.lin")
        _both(key_map, f"{d}.proj_out", f"{o}.linear2")
        key_map[f"{d}.attn.norm_q.weight"] = f"{o}.norm.query_norm.scale"
        key_map[f"{d}.attn.norm_k.weight"] = f"{o}.norm.key_norm.scale"
    for diffusers, original in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"),
                                ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                                ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                                ("context_embedder", "txt_in"),
                                ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                                ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                                ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                                ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")):
        _both(key_map, diffusers, original)
    for end in ("weight", "bias"):
        key_map[f"norm_out.linear.{end}"] = (f"final_layer.adaLN_modulation.1.{end}", None, _swap_scale_shift)
    return key_map


def comfy_mmdit_map(config) -> dict:
    """comfy/utils.py ``mmdit_to_diffusers`` (SD3 / SD3.5): per joint block, q/k/v into ``x_block.attn.qkv``,
    ``context_block.attn.qkv`` and (SD3.5-medium) ``x_block.attn2.qkv`` rows, offset = depth·64 (SD3 has 64-wide
    heads, as many as blocks); the ``MMDIT_MAP_BLOCK`` and ``MMDIT_MAP_BASIC`` pairs one to one; the last block's
    context modulation and the final one with scale and shift swapped."""
    depth = config.num_layers
    off = depth * 64
    key_map = {}
    for i in range(depth):
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for end in ("weight", "bias"):
            for j, p in enumerate("qkv"):
                key_map[f"{d}.attn.to_{p}.{end}"] = (f"{o}.x_block.attn.qkv.{end}", (0, j * off, off))
                key_map[f"{d}.attn.add_{p}_proj.{end}"] = (f"{o}.context_block.attn.qkv.{end}", (0, j * off, off))
                key_map[f"{d}.attn2.to_{p}.{end}"] = (f"{o}.x_block.attn2.qkv.{end}", (0, j * off, off))
        for diffusers, original in (("norm1_context.linear", "context_block.adaLN_modulation.1"),
                                    ("attn.to_add_out", "context_block.attn.proj"),
                                    ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                                    ("ff_context.net.2", "context_block.mlp.fc2"),
                                    ("norm1.linear", "x_block.adaLN_modulation.1"),
                                    ("attn.to_out.0", "x_block.attn.proj"), ("attn2.to_out.0", "x_block.attn2.proj"),
                                    ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2")):
            _both(key_map, f"{d}.{diffusers}", f"{o}.{original}")
        for diffusers, original in (("attn.norm_added_q", "context_block.attn.ln_q"),
                                    ("attn.norm_added_k", "context_block.attn.ln_k"),
                                    ("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                                    ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
            key_map[f"{d}.{diffusers}.weight"] = f"{o}.{original}.weight"
    for diffusers, original in (("context_embedder", "context_embedder"),
                                ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                                ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                                ("pos_embed.proj", "x_embedder.proj"),
                                ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                                ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
                                ("proj_out", "final_layer.linear")):
        _both(key_map, diffusers, original)
    key_map["pos_embed.pos_embed"] = "pos_embed"
    for end in ("weight", "bias"):
        key_map[f"norm_out.linear.{end}"] = (f"final_layer.adaLN_modulation.1.{end}", None, _swap_scale_shift)
        key_map[f"transformer_blocks.{depth - 1}.norm1_context.linear.{end}"] = (
            f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.{end}", None, _swap_scale_shift)
    return key_map


def comfy_lora_key_map(comfy_map) -> dict:
    """comfy/lora.py ``model_lora_keys_unet`` for SD3 and Flux models: ``transformer.<diffusers name without
    .weight>`` → the map's target for that weight."""
    return {f"transformer.{k[:-len('.weight')]}": v for k, v in comfy_map.items() if k.endswith(".weight")}


#: comfy/lora.py ``load_lora`` + weight_adapter LoRAAdapter.load: what it reads after a mapped name (a key with any
#: other ending is "not loaded")
COMFY_SUFFIXES = (".alpha", ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_B.weight",
                  ".lora_A.weight", "_lora.up.weight", "_lora.down.weight", ".lora.up.weight", ".lora.down.weight")


def _row_ids(state: dict) -> dict:
    """Each tensor as a (rows, 1) column of ids no other row has: the converters only slice and concatenate rows."""
    ids, start = {}, 0
    for key, t in state.items():
        rows = t.shape[0]
        ids[key] = torch.arange(start, start + rows, dtype=torch.float64).reshape(rows, 1)
        start += rows
    return ids


def comfy_original(ids: dict, comfy_map: dict) -> dict:
    """The original checkpoint ComfyUI's map describes, assembled from diffusers-named tensors: sliced entries
    concatenated in row order (their slices must tile the fused weight exactly)."""
    original, parts = {}, {}
    for key, tensor in ids.items():
        target = comfy_map[key]  # KeyError: a diffusers weight ComfyUI's map does not name
        if isinstance(target, str):
            original[target] = tensor
        elif target[1] is None:
            original[target[0]] = target[2](tensor)
        else:
            _, first, rows = target[1]
            assert tensor.shape[0] == rows, key
            parts.setdefault(target[0], []).append((first, tensor))
    for name, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        assert [p[0] for p in pieces] == [sum(t.shape[0] for _, t in pieces[:i]) for i in range(len(pieces))], name
        original[name] = torch.cat([t for _, t in pieces])
    return original


@pytest.fixture(scope="module", params=["sd3.5-medium", "sd3.5-large", "flux.1-dev"])
def arch(request):
    """(name, meta transformer, ComfyUI's map for it, its original checkpoint of row ids, diffusers' ids, the
    converter, the preset's LoRA layers as LoraWeights of placeholder tensors)."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    spec = configs.FLOW_ARCHITECTURES[request.param]
    model = configs.build_transformer(spec)
    flux = spec.model_class == "FluxTransformer2DModel"
    comfy_map = (comfy_flux_map if flux else comfy_mmdit_map)(model.config)
    ids = _row_ids(model.state_dict())  # before the adapter is added
    original = comfy_original(ids, comfy_map)
    convert = convert_flux_transformer_checkpoint_to_diffusers if flux else convert_sd3_transformer_checkpoint_to_diffusers
    config = flow_lora_config(model)
    assert config.r == config.lora_alpha == 64
    model.requires_grad_(False).add_adapter(config)
    empty = torch.empty(1, 1, device="meta")
    weights = {f"transformer.{p}": LoraLayer(empty, empty, 64.0) for p in lora_layers(model)}
    return request.param, model, comfy_map, original, ids, convert, weights


def test_comfyuis_maps_invert_diffusers_own_converters(arch):
    """ComfyUI's diffusers → original map, run back through diffusers' original → diffusers converter, gives every
    weight its own rows: the fused q/k/v (and FLUX's q/k/v/mlp linear1) slices ComfyUI patches are the right ones."""
    _, _, _, original, ids, convert, _ = arch
    left = dict(original)
    back = convert(left)
    assert not left  # the converter used every original weight ComfyUI's map produced
    assert back.keys() == ids.keys()
    assert all(torch.equal(back[k], ids[k]) for k in ids)


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_every_key_of_lcmkits_transformer_lora_lands_in_comfyui(arch, fmt):
    """Each key of the file lcmkit writes resolves, by ComfyUI's rules, to an original weight (or a row slice of a
    fused one exactly the adapted layer's size): no "lora key not loaded". The diffusers file has no alpha tensors,
    so ComfyUI applies it at scale 1, right only when alpha = rank (the preset's 64 / 64); the comfyui file carries
    alpha for any scale."""
    _, model, comfy_map, original, _, _, weights = arch
    keys = comfyui_state_dict(weights) if fmt == "comfyui" else to_state_dict(weights, "diffusers")[0]
    lora_map = comfy_lora_key_map(comfy_map)

    resolved = {}
    for key in keys:
        base = next((key[:-len(s)] for s in COMFY_SUFFIXES if key.endswith(s) and key[:-len(s)] in lora_map), None)
        assert base is not None, f"ComfyUI would not load {key}"
        resolved.setdefault(base, set()).add(key[len(base):])
    assert len(resolved) == len(weights)
    expected = {".lora_A.weight", ".lora_B.weight"} | ({".alpha"} if fmt == "comfyui" else set())
    assert all(parts == expected for parts in resolved.values())
    for base in resolved:
        target = lora_map[base]
        module = model.get_submodule(base[len("transformer."):]).get_base_layer()
        if isinstance(target, str):
            assert target in original
        else:
            weight, (_, first, rows), *_ = target
            assert weight in original and first + rows <= original[weight].shape[0]
            assert rows == module.out_features  # the LoRA's ΔW is reshaped to exactly that slice
