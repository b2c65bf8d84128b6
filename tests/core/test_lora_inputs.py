"""LoRA files as users bring them, on SD 1.5 and SDXL UNets (random, meta device: names and shapes) and tiny real
ones: kohya with diffusers or original (LDM/SGM) block names, PEFT, diffusers and mixtures load with every key
resolved, or are refused naming the first key that does not; LyCORIS files are read (LoCon) or refused by name
(LoHa, LoKr, …), never half-applied."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lcmkit.errors import LcmkitError
from lcmkit.lora import lcm_lora_config, lora_layers
from lcmkit.lora_formats import (
    LoraLayer,
    load_lora,
    lora_from_state_dict,
    to_state_dict,
)
from lcmkit.lora_sgm import original_names
from lcmkit.task_arithmetic import apply_loras, attach_loras
from lcmkit_world.bench.configs import SD15, SDXL, build_unet

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch(request):
    """(name, meta UNet, a rank-1 LCM-LoRA over it with per-layer alphas 1…5, real CPU factors)."""
    spec = {"sd15": SD15, "sdxl": SDXL}[request.param]
    unet = build_unet(spec, device="meta")
    adapted = build_unet(spec, device="meta").requires_grad_(False)
    adapted.add_adapter(lcm_lora_config("sdxl" if spec.sdxl else "sd"))
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for i, path in enumerate(lora_layers(adapted)):
        module = unet.get_submodule(path)
        if isinstance(module, torch.nn.Conv2d):
            down, up = (1, module.in_channels, *module.kernel_size), (module.out_channels, 1, 1, 1)
        else:
            down, up = (1, module.in_features), (module.out_features, 1)
        weights[f"unet.{path}"] = LoraLayer(torch.randn(down, generator=gen), torch.randn(up, generator=gen),
                                            float(1 + i % 5))
    return request.param, unet, weights


def same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].alpha == b[n].alpha and torch.equal(a[n].down, b[n].down) and torch.equal(a[n].up, b[n].up), n


def original_bases(unet, weights):
    names = original_names(unet)
    return {n: "lora_unet_" + names[n.split(".", 1)[1]].replace(".", "_") for n in weights}


def test_every_layout_and_a_mixture_load_whole(arch):
    name, unet, weights = arch
    models = {"unet": unet}
    layouts = {
        "kohya, diffusers block names": to_state_dict(weights, "kohya"),
        "kohya, original block names": to_state_dict(weights, "kohya", original_bases(unet, weights)),
        "peft": to_state_dict(weights, "peft"),
        "diffusers": to_state_dict(weights, "diffusers"),
    }
    for layout, (state, header) in layouts.items():
        same(weights, lora_from_state_dict(state, models, header, source=layout))
    # a quarter of the layers in each layout, one file: every layer loads, each with its own alpha
    bases = original_bases(unet, weights)
    mixed = {}
    for i, n in enumerate(weights):
        path = n.split(".", 1)[1]
        owner = ["lora_unet_" + path.replace(".", "_"), bases[n], f"base_model.model.{path}", f"unet.{path}"][i % 4]
        state = list(layouts.values())[i % 4][0]
        keys = {k: v for k, v in state.items() if k.startswith(owner + ".")}
        assert len(keys) == (3 if i % 4 < 2 else 2), n  # kohya: down, up, alpha; PEFT/diffusers: A, B
        mixed.update(keys)
    config = {**json.loads(layouts["peft"][1]["lora_adapter_metadata"]),  # PEFT's keys are unprefixed,
              **json.loads(layouts["diffusers"][1]["lora_adapter_metadata"])}  # diffusers' say unet.
    same(weights, lora_from_state_dict(mixed, models, {"lora_adapter_metadata": json.dumps(config)}))


def test_keys_that_resolve_nowhere_are_refused_by_name(arch):
    name, unet, weights = arch
    models = {"unet": unet}
    state, _ = to_state_dict(weights, "kohya", original_bases(unet, weights))
    # a block of the other architecture (SD 1.5 has input_blocks 1-11, SDXL 1-8; SDXL's output_blocks.2.2 is an
    # upsampler, SD 1.5's is at output_blocks.2.1)
    alien = {"sd15": "lora_unet_output_blocks_2_2_conv.lora_down.weight",
             "sdxl": "lora_unet_input_blocks_11_0_in_layers_2.lora_down.weight"}[name]
    with pytest.raises(LcmkitError, match=alien.split(".")[0]) as info:
        lora_from_state_dict({**state, alien: torch.zeros(1, 4)}, models)
    assert "\n" not in str(info.value)
    # the same layer named twice, by its original and its diffusers name
    n = next(iter(weights))
    twice = {**state, **to_state_dict({n: weights[n]}, "kohya")[0]}
    with pytest.raises(LcmkitError, match="both define"):
        lora_from_state_dict(twice, models)


def test_an_sgm_kohya_file_as_sd_scripts_writes_it_loads_with_its_text_encoders(tmp_path):
    """SDXL: SGM-named UNet keys beside lora_te1_/lora_te2_ text-encoder keys, alphas as tensors."""
    pipe = tiny.tiny_sdxl()
    unet, names = pipe.unet, original_names(pipe.unet)
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "up_blocks.0.upsamplers.0.conv"
    assert names[q] == "input_blocks.3.1.transformer_blocks.0.attn1.to_q"  # tiny: one layer per block
    assert names[conv] == "output_blocks.1.2.conv"
    g = torch.Generator().manual_seed(1)
    m_q, m_conv = unet.get_submodule(q), unet.get_submodule(conv)
    state = {
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, m_q.in_features,
                                                                                                   generator=g),
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(m_q.out_features, 2,
                                                                                                 generator=g),
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
        "lora_unet_output_blocks_1_2_conv.lora_down.weight": torch.randn(2, m_conv.in_channels, 3, 3, generator=g),
        "lora_unet_output_blocks_1_2_conv.lora_up.weight": torch.randn(m_conv.out_channels, 2, 1, 1, generator=g),
        "lora_unet_output_blocks_1_2_conv.alpha": torch.tensor(4.0),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 32, generator=g),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(37, 2, generator=g),
        "lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight": torch.randn(2, 32, generator=g),
        "lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight": torch.randn(32, 2, generator=g),
    }
    save_file(state, str(tmp_path / "sgm.safetensors"))
    loaded = load_lora(tmp_path / "sgm.safetensors", unet, [pipe.text_encoder, pipe.text_encoder_2])
    assert {n.split(".")[0] for n in loaded} == {"unet", "text_encoder", "text_encoder_2"}
    assert loaded[f"unet.{q}"].scale == 0.5 and loaded[f"unet.{conv}"].scale == 2.0
    assert torch.equal(loaded[f"unet.{conv}"].down, state["lora_unet_output_blocks_1_2_conv.lora_down.weight"])


def test_sd1_kohya_with_ldm_names_loads():
    """SD 1.x LoRAs keyed by LDM names (ComfyUI and AUTOMATIC1111 accept them) map to the same layers."""
    unet = tiny.tiny_unet()
    names = original_names(unet)
    assert names["up_blocks.1.resnets.1.conv_shortcut"] == "output_blocks.3.0.skip_connection"
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.1.2.conv"
    assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.2.0.op"
    assert names["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    weights = {}
    g = torch.Generator().manual_seed(2)
    for path in ("up_blocks.1.resnets.1.conv_shortcut", "down_blocks.0.downsamplers.0.conv",
                 "mid_block.resnets.1.time_emb_proj", "conv_in", "time_embedding.linear_1"):
        m = unet.get_submodule(path)
        if isinstance(m, torch.nn.Conv2d):
            down, up = torch.randn(2, m.in_channels, *m.kernel_size, generator=g), torch.randn(m.out_channels, 2, 1, 1)
        else:
            down, up = torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2)
        weights[f"unet.{path}"] = LoraLayer(down, up, 3.0)
    state, _ = to_state_dict(weights, "kohya", original_bases(unet, weights))
    assert "lora_unet_input_blocks_0_0.alpha" in state and "lora_unet_time_embed_0.lora_up.weight" in state
    same(weights, lora_from_state_dict(state, {"unet": unet}))


# --------------------------------------------------------------------------------------------------------------
# LyCORIS
# --------------------------------------------------------------------------------------------------------------

CONV = "down_blocks.0.resnets.0.conv1"            # 3x3, 32 → 32
DOWN = "down_blocks.0.downsamplers.0.conv"        # 3x3 stride 2
K = "lora_unet_" + CONV.replace(".", "_")


def _lycoris_files():
    g = torch.Generator().manual_seed(3)
    r = torch.randn
    plain = {f"{K}.lora_down.weight": r(4, 32, 3, 3, generator=g), f"{K}.lora_up.weight": r(32, 4, 1, 1, generator=g)}
    return [
        ("LoHa", {f"{K}.hada_w1_a": r(32, 4), f"{K}.hada_w1_b": r(4, 288), f"{K}.hada_w2_a": r(32, 4),
                 f"{K}.hada_w2_b": r(4, 288), f"{K}.alpha": torch.tensor(4.0)}),
        ("LoKr", {f"{K}.lokr_w1": r(4, 4), f"{K}.lokr_w2": r(8, 8, 3, 3), f"{K}.alpha": torch.tensor(4.0)}),
        ("GLoRA", {f"{K}.a1.weight": r(4, 32), f"{K}.a2.weight": r(32, 4), f"{K}.b1.weight": r(4, 288),
                   f"{K}.b2.weight": r(32, 4)}),
        ("IA3", {f"{K}.weight": r(32), f"{K}.on_input": torch.tensor(False)}),
        ("OFT", {f"{K}.oft_blocks": r(4, 8, 8), f"{K}.alpha": torch.tensor(1.0)}),
        ("DoRA", {**plain, f"{K}.dora_scale": r(1, 32, 1, 1)}),
        ("full (weight difference)", {f"{K}.diff": r(32, 32, 3, 3)}),
        # a plain LoRA file with one LoHa layer after it: refused whole, not applied in part
        ("LoHa", {**plain, "lora_unet_" + DOWN.replace(".", "_") + ".hada_w1_a": r(32, 4)}),
    ]


def test_other_lycoris_types_are_refused_by_name_never_half_applied(tmp_path):
    pipe = tiny.tiny_sd()
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(4))
    conv = pipe.unet.get_submodule(CONV)
    before = conv(x)
    for i, (kind, state) in enumerate(_lycoris_files()):
        path = tmp_path / f"{i}-{kind.split()[0]}.safetensors"
        save_file(state, str(path))
        with pytest.raises(LcmkitError) as info:
            apply_loras(pipe, [(path, 1.0)])
        message = str(info.value)
        assert kind in message and "\n" not in message and str(path) in message, message
        assert torch.equal(conv(x), before), kind  # nothing was attached


def _locon_reference(conv, x, down, mid, up, scale):
    """LyCORIS LoCon's forward: base conv + scale · up(mid(down(x))), the core carrying the kernel and stride."""
    h = F.conv2d(x, down)
    h = F.conv2d(h, mid, None, conv.stride, conv.padding, conv.dilation)
    return conv(x) + scale * F.conv2d(h, up)


@pytest.mark.parametrize("path", [CONV, DOWN])
def test_locon_with_and_without_a_cp_core_loads_exactly(path, tmp_path):
    unet = tiny.tiny_unet()
    conv = unet.get_submodule(path)
    g = torch.Generator().manual_seed(5)
    key = "lora_unet_" + path.replace(".", "_")
    x = torch.randn(2, conv.in_channels, 8, 8, generator=g)
    down3, up = torch.randn(4, conv.in_channels, 3, 3, generator=g), torch.randn(conv.out_channels, 4, 1, 1, generator=g)
    down1, mid = torch.randn(4, conv.in_channels, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    cases = {
        "locon": ({f"{key}.lora_down.weight": down3, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)},
                  lambda: conv(x) + 0.5 * F.conv2d(F.conv2d(x, down3, None, conv.stride, conv.padding), up)),
        "locon + lora_mid": ({f"{key}.lora_down.weight": down1, f"{key}.lora_mid.weight": mid,
                              f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)},
                             lambda: _locon_reference(conv, x, down1, mid, up, 0.5)),
    }
    for case, (state, reference) in cases.items():
        save_file(state, str(tmp_path / "locon.safetensors"))
        weights = load_lora(tmp_path / "locon.safetensors", unet)
        assert list(weights) == [f"unet.{path}"] and weights[f"unet.{path}"].rank == 4
        with torch.no_grad():
            want = reference()
            with attach_loras({"unet": unet}, [(weights, 1.0)]):
                got = conv(x)
        assert (got - want).abs().max() < 1e-4 * want.abs().max(), case
    bad = {f"{key}.lora_down.weight": down1, f"{key}.lora_mid.weight": torch.randn(3, 4, 3, 3),
           f"{key}.lora_up.weight": up}
    with pytest.raises(LcmkitError, match="lora_mid"):
        lora_from_state_dict(bad, {"unet": unet})
