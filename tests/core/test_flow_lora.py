"""LCM-LoRA on the rectified-flow transformers (issue 22): the target presets on SD3.5-medium, SD3.5-large and
FLUX.1-dev (full-size configs on the meta device, counts at rank 64), and a LoRA lcmkit injects with peft and writes
in diffusers' format loading whole in ``StableDiffusion3Pipeline.load_lora_weights``, with the same output."""

from __future__ import annotations

import pytest
import tiny
import torch

from lcmkit.errors import LcmkitError
from lcmkit.lora import FLOW_LORA_TARGETS, adapter_weights, flow_lora_config, flow_lora_preset, lora_layers
from lcmkit.lora_export import write_lora_files
from lcmkit_world.bench import configs

torch.set_num_threads(1)


# name → (LoRA layers, trainable parameters at rank 64, transformer parameters, state-dict numbers)
COUNTS = {
    "sd3.5-medium": (337, 93_978_624, 2_243_171_520, 2_469_663_936),
    "sd3.5-large": (453, 211_058_688, 8_056_627_520, 8_146_280_768),
    "flux.1-dev": (418, 261_488_640, 11_901_408_320, 11_901_408_320),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_flow_lora_parameter_counts_on_full_size_transformers(name):
    arch = configs.FLOW_ARCHITECTURES[name]
    counted = configs.flow_lora_trainable_parameters(arch)
    layers, trainable, params, stored = COUNTS[name]
    assert (counted["lora_layers"], counted["trainable_params"]) == (layers, trainable)
    assert (counted["transformer_params"], counted["checkpoint_params"]) == (params, stored)
    # the published sizes (2.5B / 8.1B / 11.9B) count the checkpoint, SD3's position table included
    assert counted["checkpoint_params"] == pytest.approx(arch.published_params, rel=0.02)


def test_flow_presets_pick_by_class_and_leave_fluxs_final_projection_alone():
    assert flow_lora_preset("SD3Transformer2DModel") == "sd3"
    assert flow_lora_preset("FluxTransformer2DModel") == "flux"
    with pytest.raises(ValueError):
        flow_lora_preset("UNet2DConditionModel")
    with torch.device("meta"):
        flux = configs.build_transformer(configs.FLUX1_DEV)
        flux.add_adapter(flow_lora_config(flux))
    adapted = set(lora_layers(flux))
    assert "proj_out" not in adapted and "single_transformer_blocks.37.proj_out" in adapted
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.ff_context.net.2",
            "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"} <= adapted
    assert {n.split(".", 2)[2] for n in adapted if n.startswith("transformer_blocks.")} == {
        "attn." + t if not t.startswith("ff") else t for t in FLOW_LORA_TARGETS["sd3"]}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g), timestep=torch.tensor([900.0, 250.0]),
                encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
                pooled_projections=torch.randn(2, 64, generator=g))


def test_sd3_lora_written_by_lcmkit_loads_whole_in_diffusers(tmp_path):
    pipe = tiny.tiny_sd3()
    transformer = pipe.transformer
    transformer.add_adapter(flow_lora_config(transformer, rank=4, alpha=6.0))  # scale 1.5: the header alpha counts
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(transformer.named_parameters()):
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ours = set(lora_layers(transformer))
    assert len(ours) == 21  # 12 in the first joint block, 9 in the context-pre-only last one
    with torch.no_grad():
        expected = transformer(**_inputs(), return_dict=False)[0]
        transformer.disable_adapters()
        base = transformer(**_inputs(), return_dict=False)[0]
        transformer.enable_adapters()
    assert (expected - base).abs().max() > 1e-2  # the LoRA changes the output

    weights = adapter_weights(transformer, component="transformer")
    written = write_lora_files(weights, tmp_path / "pytorch_lora_weights.safetensors", formats="diffusers")
    assert list(written) == ["diffusers"]
    with pytest.raises(LcmkitError, match="no kohya key convention for transformer"):
        write_lora_files(weights, tmp_path / "kohya" / "lora.safetensors", formats="kohya")
    from safetensors import safe_open

    with safe_open(written["diffusers"], "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 2 * len(ours) and all(k.startswith("transformer.") for k in keys)
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in keys

    fresh = tiny.tiny_sd3()  # same seed: the same base weights
    fresh.load_lora_weights(str(tmp_path))
    loaded = set(lora_layers(fresh.transformer))
    assert loaded == ours and len(loaded) == 21
    module = fresh.transformer.get_submodule("transformer_blocks.1.ff.net.2")
    (adapter,) = module.scaling
    assert module.scaling[adapter] == 1.5
    with torch.no_grad():
        got = fresh.transformer(**_inputs(), return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
