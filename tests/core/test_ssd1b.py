"""SSD-1B (Segmind's distilled SDXL) as lcmkit sees it: its UNet config (``lcmkit_world.bench.configs.SSD1B``, facts
from ComfyUI's model detection), the LCM-LoRA preset's size on it against the LCM-LoRA report's 105M, its original-
layout names, and two LCM-LoRA distillation steps on the full-size architecture with random weights."""

from __future__ import annotations

import pytest
import tiny
import torch

from lcmkit_world.bench import configs

torch.set_num_threads(1)


def test_lcm_lora_on_ssd1b_is_the_reports_105m():
    from lcmkit_world.bench.distill import LORA_PARAMS_REPORT

    counted = configs.lora_trainable_parameters(configs.SSD1B)
    assert counted["unet_params"] == 1_331_334_404  # "1.3B" (SDXL's: 2,567M)
    assert counted["lora_layers"] == 423
    assert abs(counted["trainable_params"] - LORA_PARAMS_REPORT["ssd1b"]) <= 0.2e6  # 104.9M against 105M
    assert list(LORA_PARAMS_REPORT) == ["sd15", "ssd1b", "sdxl"]  # the rows lcmkit bench distill prints


def test_ssd1b_original_layout_is_comfyuis():
    """ComfyUI's SSD_1B: transformer_depth_output [0, 0, 0, 1, 1, 2, 10, 4, 4] (level order, popped from the end:
    output blocks 0 … 5 have 4, 4, 10, 2, 1, 1 layers), a middle block of one ResBlock; the names convert back
    through diffusers' converter to the same UNet."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lcmkit.single_file_export import unet_state

    unet = configs.build_unet(configs.SSD1B, device="meta")
    original = unet_state(unet)
    depth = {n: len({k.split(".")[6] for k in original
                     if k.startswith(f"model.diffusion_model.output_blocks.{n}.1.transformer_blocks.")})
             for n in range(9)}
    assert [depth[n] for n in range(9)] == [4, 4, 10, 2, 1, 1, 0, 0, 0]
    assert {k.split(".")[3] for k in original if ".middle_block." in k} == {"0"}
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert back.keys() == unet.state_dict().keys()


def _random_weights(unet, seed: int = 0):
    """Fill a meta-device UNet with small random weights (faster than the default init; values do not matter)."""
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return unet.eval()


@pytest.mark.slow  # ~45 s on one core: a 1.3B-parameter UNet, 7.5 GB of memory
def test_two_lcm_lora_distillation_steps_on_ssd1b():
    """lcmkit's own distillation pieces (build_models, make_denoisers, lcd_loss, AdamW) on the full-size SSD-1B UNet
    at a 64-px latent grid of 8×8: the recipe's forwards, finite losses, the LoRA moves and the teacher does not."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from lcmkit.denoisers import TextConditioning
    from lcmkit.train.config import OptimConfig
    from lcmkit.train.distill import build_models
    from lcmkit.train.optim import make_optimizer
    from lcmkit.train.rng import generator_for
    from lcmkit_world.bench.distill import (
        PhaseClock,
        RecipeSettings,
        check_forwards,
        one_step,
    )

    unet = _random_weights(configs.build_unet(configs.SSD1B, device="meta"))
    pipe = StableDiffusionXLPipeline(  # the text encoders are not run: the conditioning below is drawn directly
        unet=unet, vae=tiny.tiny_vae(), text_encoder=tiny.tiny_text_encoder(),
        text_encoder_2=tiny.tiny_text_encoder(with_projection=True), tokenizer=tiny.tiny_tokenizer(),
        tokenizer_2=tiny.tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(**configs.SCHEDULE, steps_offset=1, timestep_spacing="leading"))
    models = build_models(RecipeSettings("lora", "random ssd1b"), pipe, torch.device("cpu"), generator_for(0, 1))
    assert models.arch == "sdxl" and sum(p.numel() for p in models.trainable()) == pytest.approx(104.9e6, abs=0.1e6)
    optimizer = make_optimizer(models.trainable(), OptimConfig(lr=1e-4, warmup_steps=0))
    g = torch.Generator().manual_seed(0)
    cond = TextConditioning(torch.randn(1, 8, 2048, generator=g), torch.randn(1, 1280, generator=g),
                            torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]))
    uncond = TextConditioning(torch.zeros(1, 8, 2048), torch.zeros(1, 1280), cond.time_ids)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    to_q = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q  # a LoRA-wrapped base layer
    frozen = to_q.base_layer.weight.detach().clone()
    before = {n: p.detach().clone() for n, p in models.trainable_named() if "lora_B" in n}
    for step in range(2):
        clock = PhaseClock({models.teacher}, torch.device("cpu"))
        loss = one_step(models, optimizer, clock, z0, cond, uncond, "ddim", 20, step)
        clock.close()
        assert check_forwards(clock.forwards, "ddim", 1) == {"teacher": 1, "target": 1, "student": 1}
        assert torch.isfinite(torch.tensor(loss))
    after = dict(models.trainable_named())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # B left zero: the LoRA trained
    assert torch.equal(frozen, to_q.base_layer.weight)  # the base (teacher) weights did not move
