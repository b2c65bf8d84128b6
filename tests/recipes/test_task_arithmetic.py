"""Task arithmetic θ' = θ_pre + Σ λ_i τ_i (LCM-LoRA report eqs. 2–3): merged == fused == on the fly, λ = 0 is the
base bit for bit, fused LoRAs restore every weight bit for bit (also after an exception), and ``lcmkit lora
combine`` end to end on a tiny SD pipeline."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from test_lora_formats import random_lora

from lcmkit.cli import main
from lcmkit.lora_formats import pipeline_models, save_lora
from lcmkit.errors import LcmkitError
from lcmkit.lora_formats import LoraLayer
from lcmkit.task_arithmetic import apply_loras, attach_loras, fuse_loras, lora_delta, merge_loras

IDS = torch.arange(2, 2 + 12)[None]  # 12 tokens of the tiny byte-level tokenizer


def unet_out(unet, text_encoder, seed=0):
    """One UNet forward on fixed inputs, conditioned through ``text_encoder`` (so text-encoder LoRAs count)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 301]), text_encoder(IDS)[0].expand(2, -1, -1)).sample


def rel_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def sd():
    return tiny.tiny_sd()


@pytest.fixture(scope="module")
def two_loras(sd):
    models = pipeline_models(sd)
    return random_lora(models, seed=10), random_lora(models, seed=11, text=False)


def test_delta_is_scaled_up_down_product(two_loras):
    layer = two_loras[0]["unet.down_blocks.0.resnets.0.conv1"]  # 3x3 conv
    delta = lora_delta(layer)
    assert delta.shape == (layer.up.shape[0], *layer.down.shape[1:])
    expected = torch.einsum("or,rihw->oihw", layer.up[:, :, 0, 0].double(), layer.down.double())
    assert torch.allclose(delta.double(), layer.alpha / layer.rank * expected, rtol=1e-5, atol=1e-7)


def test_merged_equals_on_the_fly(sd, two_loras):
    models = pipeline_models(sd)
    loras = [(two_loras[0], 0.8), (two_loras[1], 1.0)]
    base = unet_out(sd.unet, sd.text_encoder)
    merged = merge_loras(models, loras)
    assert merged["unet"] is not sd.unet and merged["text_encoder"] is not sd.text_encoder
    out_merged = unet_out(merged["unet"], merged["text_encoder"])
    with attach_loras(models, loras) as applied:
        assert applied.layers == len(set(two_loras[0]) | set(two_loras[1]))
        out_fly = unet_out(sd.unet, sd.text_encoder)
    assert rel_diff(out_merged, base) > 0.1                      # the LoRAs matter (measured 1.08)
    assert rel_diff(out_merged, out_fly) <= 1e-5                 # float32 rounding only (measured 1.6e-6)
    assert torch.equal(unet_out(sd.unet, sd.text_encoder), base)  # hooks removed, originals untouched


def test_lambda_zero_leaves_the_base_bit_for_bit(sd, two_loras):
    models = pipeline_models(sd)
    for loras in ([(two_loras[0], 0.0)], [(two_loras[0], 0.0), (two_loras[1], 0.0)]):
        merged = merge_loras(models, loras)
        for component, model in models.items():
            before, after = model.state_dict(), merged[component].state_dict()
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before), component
        with attach_loras(models, loras) as applied:
            assert applied.layers == 0
    # a zero weight next to a non-zero one: only the non-zero LoRA is in the result, exactly
    one = merge_loras(models, [(two_loras[1], 1.0)])["unet"].state_dict()
    both = merge_loras(models, [(two_loras[0], 0.0), (two_loras[1], 1.0)])["unet"].state_dict()
    assert all(torch.equal(one[k], both[k]) for k in one)


def test_apply_loras_on_a_pipeline(sd, two_loras, tmp_path):
    path = save_lora(two_loras[0], tmp_path / "style.safetensors", fmt="kohya")
    base = unet_out(sd.unet, sd.text_encoder)
    merged = merge_loras(pipeline_models(sd), [(two_loras[0], 0.5)])
    with apply_loras(sd, [(path, 0.5)]) as applied:
        assert applied.layers == len(two_loras[0])
        assert rel_diff(unet_out(sd.unet, sd.text_encoder), unet_out(merged["unet"], merged["text_encoder"])) <= 1e-5
    with apply_loras(sd, [f"{path}:0"]):
        assert torch.equal(unet_out(sd.unet, sd.text_encoder), base)
    assert torch.equal(unet_out(sd.unet, sd.text_encoder), base)


def snapshot(models) -> dict[str, torch.Tensor]:
    """A copy of every parameter of ``models``, keyed ``component.parameter``."""
    return {f"{c}.{k}": p.detach().clone() for c, m in models.items() for k, p in m.named_parameters()}


def changed(models, before) -> list[str]:
    after = snapshot(models)
    assert after.keys() == before.keys()
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


def hooked(models) -> int:
    return sum(len(m._forward_hooks) for model in models.values() for m in model.modules())


def test_fused_equals_merged_and_on_the_fly_and_restores_bit_for_bit(sd, two_loras):
    models = pipeline_models(sd)
    loras = [(two_loras[0], 0.8), (two_loras[1], 1.0)]
    touched = set(two_loras[0]) | set(two_loras[1])
    before = snapshot(models)
    base = unet_out(sd.unet, sd.text_encoder)
    merged = merge_loras(models, loras)
    with attach_loras(models, loras):
        fly = unet_out(sd.unet, sd.text_encoder)
    with fuse_loras(models, loras) as fused:
        assert fused.layers == len(touched) and hooked(models) == 0
        assert changed(models, before) == sorted(f"{name}.weight" for name in touched)  # only the LoRAs' layers
        for component, model in merged.items():  # the same float32 sum, cast once: merge_loras' weights exactly
            now = model.state_dict()
            assert all(torch.equal(now[k], v) for k, v in models[component].state_dict().items()), component
        out_fused = unet_out(sd.unet, sd.text_encoder)
    assert rel_diff(out_fused, base) > 0.1     # the LoRAs matter
    assert rel_diff(out_fused, fly) <= 1e-5    # float32 rounding only
    assert changed(models, before) == []       # every unet / text-encoder parameter bit for bit
    assert torch.equal(unet_out(sd.unet, sd.text_encoder), base)


def test_overlapping_fused_uses_restore_exactly_in_any_order(sd, two_loras, tmp_path):
    """Two uses of one pipeline alive at once (two paused generate_batches, say), ended first-in-first-out: the
    second must not fuse over the first (each restores what it saved), so it gets hooks and both end exact."""
    models = pipeline_models(sd)
    a = save_lora(two_loras[0], tmp_path / "a.safetensors", fmt="kohya")
    b = save_lora(two_loras[1], tmp_path / "b.safetensors", fmt="kohya")
    before = snapshot(models)
    base = unet_out(sd.unet, sd.text_encoder)
    both = merge_loras(models, [(two_loras[0], 1.0), (two_loras[1], 1.0)])
    only_b = merge_loras(models, [(two_loras[1], 1.0)])  # before any hook: copies would carry them
    first = apply_loras(sd, [(a, 1.0)], fuse=True)
    second = apply_loras(sd, [(b, 1.0)], fuse=True)
    assert hooked(models) == second.layers > 0  # the second fell back to hooks
    assert rel_diff(unet_out(sd.unet, sd.text_encoder), unet_out(both["unet"], both["text_encoder"])) <= 1e-5
    first.remove()  # out of order
    assert rel_diff(unet_out(sd.unet, sd.text_encoder), unet_out(only_b["unet"], only_b["text_encoder"])) <= 1e-5
    second.remove()
    assert changed(models, before) == [] and hooked(models) == 0
    assert torch.equal(unet_out(sd.unet, sd.text_encoder), base)
    with apply_loras(sd, [(b, 1.0)], fuse=True):  # nothing fused any more: this one fuses
        assert hooked(models) == 0


def test_fused_restores_after_an_exception_in_the_block(sd, two_loras):
    models = pipeline_models(sd)
    before = snapshot(models)
    with pytest.raises(RuntimeError, match="sampling failed"):
        with fuse_loras(models, [(two_loras[0], 0.8), (two_loras[1], 1.0)]):
            assert changed(models, before)
            raise RuntimeError("sampling failed")
    assert changed(models, before) == []
    with fuse_loras(models, [(two_loras[0], 0.0)]) as fused:  # λ = 0: nothing touched, nothing copied
        assert fused.layers == 0 and changed(models, before) == []


def test_a_fuse_that_overflows_half_way_restores_the_layers_already_fused(sd, two_loras, monkeypatch):
    """fp16: the last layer's merged weight overflows after the others were written; all are put back."""
    import copy

    from lcmkit.task_arithmetic import FusedLoras

    models = {"unet": copy.deepcopy(sd.unet).half()}
    weights = dict(two_loras[1])
    last = list(weights)[-1]
    weights[last] = LoraLayer(weights[last].down, weights[last].up * 1e6, weights[last].alpha)
    before = snapshot(models)
    with fuse_loras(models, [(two_loras[1], 1.0)]):  # the same LoRA without the overflow fuses
        assert len(changed(models, before)) == len(weights)
    at_restore, restore = [], FusedLoras.remove

    def spy(self):
        at_restore.append(len(changed(models, before)))
        restore(self)

    monkeypatch.setattr(FusedLoras, "remove", spy)
    with pytest.raises(LcmkitError, match=f"{last}.weight non-finite"):
        fuse_loras(models, [(weights, 1.0)])
    assert at_restore == [len(weights) - 1]  # every layer but the last was written, then all were put back
    assert changed(models, before) == []


# --- lcmkit lora combine -----------------------------------------------------------------------------------

def test_combine_cli_end_to_end(tiny_sd_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    models = pipeline_models(base)
    style, lcm = random_lora(models, seed=20), random_lora(models, seed=21, text=False)
    style_file = save_lora(style, tmp_path / "style.safetensors", fmt="kohya")
    lcm_file = save_lora(lcm, tmp_path / "lcm.safetensors", fmt="peft")
    out = tmp_path / "merged"

    args = ["lora", "combine", str(tiny_sd_dir), "--lora", f"{style_file}:0.8", "--lora", f"{lcm_file}:1.0",
            "--out", str(out)]
    assert main(args) == 0
    merged = StableDiffusionPipeline.from_pretrained(str(out))
    assert type(merged) is type(base)
    assert list(out.glob("unet/*.safetensors")) and not list(out.rglob("*.bin"))
    record = json.loads((out / "lcmkit_lora_combine.json").read_text())
    assert [(r["lambda"], r["layers"]) for r in record["loras"]] == [(0.8, len(style)), (1.0, len(lcm))]

    with attach_loras(models, [(style, 0.8), (lcm, 1.0)]):
        fly = unet_out(base.unet, base.text_encoder)
    assert rel_diff(unet_out(merged.unet, merged.text_encoder), fly) <= 1e-5

    # an existing folder needs --overwrite; a non-pipeline folder is never deleted
    capsys.readouterr()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(args[:-1] + [str(precious), "--overwrite"]) == 2
    assert (precious / "notes.txt").read_text() == "keep me"


def test_combine_refuses_a_lora_for_another_model(tiny_sd_dir, tmp_path, capsys):
    sdxl = tiny.tiny_sdxl()
    foreign = save_lora(random_lora(pipeline_models(sdxl), seed=30, text=False), tmp_path / "xl.safetensors")
    capsys.readouterr()
    assert main(["lora", "combine", str(tiny_sd_dir), "--lora", str(foreign), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "attn2.to_k.lora_A.weight" in err and "another base model" in err
    assert not (tmp_path / "o").exists()


def test_combine_refuses_a_pickle_without_opening_it(tiny_sd_dir, tmp_path, capsys):
    import pickle

    from test_lora_formats import _Payload

    marker = tmp_path / "pwned"
    evil = tmp_path / "style.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    capsys.readouterr()
    assert main(["lora", "combine", str(tiny_sd_dir), "--lora", f"{evil}:0.8", "--out", str(tmp_path / "o")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("fuse", [False, True])
def test_on_the_fly_lora_on_top_of_a_peft_adapter(tiny_sd_pipe, tmp_path, fuse):
    """A UNet that diffusers/peft already wrapped (a LoRA loaded the diffusers way) still takes lcmkit's LoRAs:
    the hook (or the fused weight) goes on the wrapped base layer. With peft's adapter disabled the result is exactly
    lcmkit's LoRA alone; with it enabled both apply; leaving the block restores the peft-only model."""
    import torch
    from peft import LoraConfig

    unet = tiny_sd_pipe.unet
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    h = torch.randn(1, 4, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "l.safetensors"
    save_lora(random_lora(pipeline_models(tiny_sd_pipe), seed=3, text=False), path, "diffusers")
    with torch.no_grad():
        with apply_loras(tiny_sd_pipe, [(path, 1.0)], fuse=fuse):
            ours_alone = unet(x, t, h).sample
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                                    init_lora_weights=False))
        peft_only = unet(x, t, h).sample
        with apply_loras(tiny_sd_pipe, [(path, 1.0)], fuse=fuse):
            both = unet(x, t, h).sample
            unet.disable_adapters()
            ours_under_wrapper = unet(x, t, h).sample
            unet.enable_adapters()
        assert torch.equal(unet(x, t, h).sample, peft_only)
    torch.testing.assert_close(ours_under_wrapper, ours_alone, atol=1e-6, rtol=1e-5)
    assert (both - peft_only).abs().max() > 1e-3 and (both - ours_alone).abs().max() > 1e-3
