"""LoRA files: kohya / PEFT / diffusers / mixed, read key by key against the real module names; safetensors only.

The LoRAs here are random with every rank and alpha distinct enough that a wrong scale, a swapped factor or a
dropped layer shows up, and they touch linear layers, 1x1 and 3x3 convs (strided ones too) and a text encoder.
"""

from __future__ import annotations

import json
import pickle

import pytest
import tiny
import torch
from safetensors.torch import save_file

from lcmkit.errors import LcmkitError
from lcmkit.lora_formats import (
    LoraLayer,
    load_lora,
    lora_from_state_dict,
    pipeline_models,
    save_lora,
    to_state_dict,
)

#: Layers of the tiny UNet / text encoder the random LoRAs touch: every kind in docs/reference.md, LCM-LoRA targets.
UNET_TARGETS = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.1.proj_in",          # 1x1 conv
    "up_blocks.0.attentions.1.proj_out",
    "down_blocks.0.resnets.0.conv1",             # 3x3 conv
    "up_blocks.1.resnets.0.conv_shortcut",       # 1x1 conv
    "down_blocks.0.downsamplers.0.conv",         # 3x3 stride 2
    "up_blocks.0.upsamplers.0.conv",
    "mid_block.resnets.1.time_emb_proj",
]
TE_TARGETS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.0.mlp.fc1"]


def random_lora(models, seed=0, scale=0.05, text=True) -> dict[str, LoraLayer]:
    """A random LoRA over UNET_TARGETS (+ TE_TARGETS) with ranks 2/3/4 and odd alphas; B is non-zero."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"unet.{p}" for p in UNET_TARGETS]
    if text:
        te = models["text_encoder"]
        prefix = "text_model." if hasattr(te, "text_model") else ""
        names += [f"text_encoder.{prefix}{p}" for p in TE_TARGETS]
    weights = {}
    for i, name in enumerate(names):
        component, path = name.split(".", 1)
        module = models[component].get_submodule(path)
        rank = 2 + i % 3
        if isinstance(module, torch.nn.Conv2d):
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        down = torch.randn(down_shape, generator=gen)
        up = scale * torch.randn(up_shape, generator=gen)
        alpha = float(torch.tensor([0.37, 8.0, 3.0][i % 3], dtype=torch.float32))
        weights[name] = LoraLayer(down, up, alpha)
    return weights


def assert_same_weights(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].down, b[name].down), name
        assert torch.equal(a[name].up, b[name].up), name
        assert a[name].alpha == b[name].alpha, name


@pytest.fixture(scope="module")
def sd():
    pipe = tiny.tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def models(sd):
    return pipeline_models(sd)


def load(path, models):
    return load_lora(path, models["unet"], [models["text_encoder"]])


# --- conversions ---------------------------------------------------------------------------------------------

def test_round_trip_diffusers_kohya_peft_diffusers(models, tmp_path):
    original = random_lora(models)
    current = original
    for fmt in ("diffusers", "kohya", "peft", "diffusers"):
        path = save_lora(current, tmp_path / f"{fmt}.safetensors", fmt=fmt)
        current = load(path, models)
        assert_same_weights(original, current)
    # the files look like what other tools write
    kohya, _ = to_state_dict(original, "kohya")
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in kohya
    assert "lora_unet_up_blocks_1_resnets_0_conv_shortcut.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in kohya
    peft, header = to_state_dict(original, "peft")
    assert "base_model.model.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.lora_A.weight" in peft
    assert "lora_adapter_metadata" in header
    diffusers, _ = to_state_dict(original, "diffusers")
    assert "unet.down_blocks.0.resnets.0.conv1.lora_B.weight" in diffusers
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in diffusers


def test_mixed_file_loads_every_layer(models):
    """A third of the layers in kohya keys, a third PEFT, a third diffusers: all load (diffusers' first-key
    detection would convert only one of the three kinds)."""
    original = random_lora(models, seed=1)
    states = [to_state_dict(original, fmt)[0] for fmt in ("kohya", "peft", "diffusers")]
    headers = [to_state_dict(original, fmt)[1] for fmt in ("kohya", "peft", "diffusers")]
    mixed = {}
    for i, name in enumerate(original):
        fmt = i % 3
        path = name.split(".", 1)[1]
        needles = [path.replace(".", "_") + ".", path + ".lora_"]
        mixed.update({k: v for k, v in states[fmt].items() if any(n in k for n in needles)})
    # kohya keys carry their alphas; PEFT and diffusers alphas come from their header configs (one header:
    # PEFT's keys are unprefixed, diffusers' prefixed by the component, so both fit in one JSON)
    config = {**json.loads(headers[1]["lora_adapter_metadata"]), **json.loads(headers[2]["lora_adapter_metadata"])}
    loaded = lora_from_state_dict(mixed, models, {"lora_adapter_metadata": json.dumps(config)})
    assert_same_weights(original, loaded)


def test_mixed_kohya_and_peft_halves(models, tmp_path):
    original = random_lora(models, seed=2, text=False)
    kohya, _ = to_state_dict(original, "kohya")
    peft, header = to_state_dict(original, "peft")
    half = list(original)[: len(original) // 2]
    mixed = {}
    for name in original:
        path = name.split(".", 1)[1]
        if name in half:
            mixed.update({k: v for k, v in kohya.items() if k.split(".")[0] == "lora_unet_" + path.replace(".", "_")})
        else:
            mixed.update({k: v for k, v in peft.items() if k.startswith(f"base_model.model.{path}.lora_")})
    save_file(mixed, str(tmp_path / "mixed.safetensors"), metadata=header)
    loaded = load(tmp_path / "mixed.safetensors", models)
    assert_same_weights(original, loaded)


def test_older_diffusers_layouts_and_peft_adapter_names(models):
    unet = models["unet"]
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    q, out = unet.get_submodule(attn + ".to_q"), unet.get_submodule(attn + ".to_out.0")
    te_q = models["text_encoder"].get_submodule(TE_TARGETS[0])
    fc1 = models["text_encoder"].get_submodule(TE_TARGETS[2])
    conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    r = 2
    state = {
        f"unet.{attn}.processor.to_q_lora.down.weight": torch.randn(r, q.in_features),
        f"unet.{attn}.processor.to_q_lora.up.weight": torch.randn(q.out_features, r),
        f"unet.{attn}.processor.to_out_lora.down.weight": torch.randn(r, out.in_features),
        f"unet.{attn}.processor.to_out_lora.up.weight": torch.randn(out.out_features, r),
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.randn(r, conv.in_channels, 3, 3),
        "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": torch.randn(conv.out_channels, r, 1, 1),
        "unet.down_blocks.0.resnets.0.conv1.alpha": torch.tensor(1.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.randn(r, te_q.in_features),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.randn(te_q.out_features, r),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": torch.randn(r, 32),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight":
            torch.randn(fc1.out_features, r),
        # PEFT, with an adapter name in the key
        "base_model.model.mid_block.resnets.0.time_emb_proj.lora_A.default.weight": torch.randn(r, 32 * 4),
        "base_model.model.mid_block.resnets.0.time_emb_proj.lora_B.default.weight": torch.randn(64, r),
    }
    loaded = lora_from_state_dict(state, models)
    te_prefix = "text_model." if hasattr(models["text_encoder"], "text_model") else ""
    assert set(loaded) == {
        f"unet.{attn}.to_q", f"unet.{attn}.to_out.0", "unet.down_blocks.0.resnets.0.conv1",
        f"text_encoder.{te_prefix}{TE_TARGETS[0]}", f"text_encoder.{te_prefix}{TE_TARGETS[2]}",
        "unet.mid_block.resnets.0.time_emb_proj",
    }
    assert loaded["unet.down_blocks.0.resnets.0.conv1"].alpha == 1.0
    assert loaded[f"unet.{attn}.to_q"].alpha == r  # no alpha anywhere: alpha = rank


def test_tiny_diffusers_file_loads(models, tmp_path):
    path = tiny.tiny_lora_file(models["unet"], tmp_path / "tiny_lora.safetensors")
    loaded = load(path, models)
    attention = [n for n, _ in models["unet"].named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert sorted(loaded) == sorted(f"unet.{n}" for n in attention)
    assert all(layer.alpha == 4 for layer in loaded.values())


# --- errors: nothing dropped silently ------------------------------------------------------------------------

def _bad(models, state, needle):
    with pytest.raises(LcmkitError) as info:
        lora_from_state_dict(state, models)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unmatched_and_misfit_keys_raise_with_their_name(models):
    good = to_state_dict(random_lora(models, text=False), "kohya")[0]
    bad = "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"
    _bad(models, {**good, bad: torch.zeros(2, 32)}, bad)
    bad = "base_model.model.down_blocks.0.resnets.0.norm1.lora_A.weight"  # a GroupNorm
    _bad(models, {bad: torch.zeros(2, 32), bad.replace("lora_A", "lora_B"): torch.zeros(32, 2)}, bad)
    bad = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"  # SDXL-sized input
    _bad(models, {bad: torch.zeros(2, 64), bad.replace("lora_A", "lora_B"): torch.zeros(64, 2)}, bad)
    _bad(models, {"something.else.weight": torch.zeros(1)}, "something.else.weight")
    bad = "lora_unet_input_blocks_4_1_proj_in.lora_down.weight"
    _bad(models, {bad: torch.zeros(2, 64)}, "SGM")
    bad = "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"
    _bad(models, {bad: torch.zeros(2, 2)}, bad)
    lonely = "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"
    _bad(models, {lonely: torch.zeros(2, 32, 3, 3)}, lonely)
    with pytest.raises(LcmkitError, match="text_encoder_2"):
        lora_from_state_dict({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                              torch.zeros(2, 32)}, models)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this object creates the marker file
        return open, (self.marker, "w")


def test_pickles_are_refused_unopened(models, tmp_path):
    live = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(live))).close()
    assert live.exists()  # the payload is real: unpickling runs it

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    for name in ("evil.ckpt", "evil.bin", "evil.pt", "evil.safetensors", "no_suffix"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(LcmkitError, match="pickle|safetensors"):
            load(tmp_path / name, models)
    zipped = tmp_path / "torch_save.safetensors"
    torch.save({"x": torch.zeros(1)}, zipped)
    with pytest.raises(LcmkitError, match="pickle"):
        load(zipped, models)
    assert not marker.exists()


# --- diffusers reads our diffusers files, every layer, with our alphas ----------------------------------------

def test_diffusers_format_loads_in_diffusers_with_all_layers(tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lcmkit.task_arithmetic import attach_loras

    pipe = tiny.tiny_sd()
    models = pipeline_models(pipe)
    weights = random_lora(models, seed=3)
    path = save_lora(weights, tmp_path / "lora.safetensors", fmt="diffusers")

    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ids = torch.arange(2, 2 + 12)[None]
    with torch.no_grad():
        base = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
        with attach_loras(models, [(weights, 1.0)]):
            ours = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
    assert (ours - base).abs().max() > 0.1  # the LoRA matters (measured: 1.6)

    pipe.load_lora_weights(str(path), adapter_name="ours")
    hooked = {c: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, c).modules())
              for c in ("unet", "text_encoder")}
    assert hooked == {"unet": len(UNET_TARGETS), "text_encoder": len(TE_TARGETS)}
    with torch.no_grad():
        theirs = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
    # same outputs: every layer applied, with our per-layer alphas and ranks (measured: 7.7e-7 of 1.2)
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


def test_sdxl_two_text_encoders(tmp_path):
    """SDXL: kohya writes lora_te1_/lora_te2_; both CLIP spellings (flattened text encoder 1, ``text_model.``
    text encoder 2) round-trip; diffusers applies every layer of our file to all three models."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lcmkit.task_arithmetic import attach_loras

    pipe = tiny.tiny_sdxl()
    models = pipeline_models(pipe)
    weights = random_lora(models, seed=4)
    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj"
    module = models["text_encoder_2"].get_submodule(te2.split(".", 1)[1])
    weights[te2] = LoraLayer(torch.randn(3, module.in_features), torch.randn(module.out_features, 3), 1.5)

    kohya, _ = to_state_dict(weights, "kohya")
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.alpha" in kohya
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in kohya
    current = weights
    for fmt in ("kohya", "peft", "diffusers"):
        current = load_lora(save_lora(current, tmp_path / f"{fmt}.safetensors", fmt=fmt), models["unet"],
                            {c: m for c, m in models.items() if c != "unet"})
        assert_same_weights(weights, current)

    # a bare key naming a CLIP layer exists in both text encoders: refused, not guessed
    with pytest.raises(LcmkitError, match="text_encoder and text_encoder_2"):
        lora_from_state_dict({"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
                              "encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)}, models)

    ids = torch.arange(2, 2 + 12)[None]
    with torch.no_grad(), attach_loras(models, [(weights, 1.0)]):
        ours = pipe.text_encoder_2(ids)[0]
    pipe.load_lora_weights(str(tmp_path / "diffusers.safetensors"), adapter_name="ours")
    hooked = {c: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, c).modules()) for c in models}
    assert hooked == {"unet": len(UNET_TARGETS), "text_encoder": len(TE_TARGETS), "text_encoder_2": 1}
    with torch.no_grad():
        theirs = pipe.text_encoder_2(ids)[0]
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()
