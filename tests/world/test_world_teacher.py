"""The world teacher recipe: builders, tokenizer, loss decreases, resume, and the saved pipeline (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from lcmkit.errors import LcmkitError
from lcmkit_world import teacher as wt
from lcmkit_world import world


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads wait on each other and run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(out, **overrides) -> wt.TrainConfig:
    base = dict(
        out=str(out), vae=wt.VaeConfig((8, 16, 16), 1, 4, 8), text=wt.TextConfig(32, 1, 2, 64, 16),
        unet=wt.UNetConfig((16, 32), 1, 2, 8), num_images=64, outlined_images=16, vae_steps=2,
        vae_decoder_steps=1, unet_steps=4, batch_size=8, vae_batch_size=8, checkpoint_every=2, threads=1,
        warmup_steps=2,
    )
    base.update(overrides)
    return wt.TrainConfig(**base)


class Interrupt(Exception):
    pass


class InterruptedTrainer(wt.Trainer):
    """Stops right after the UNet checkpoint at ``stop_at``, like a killed run."""

    stop_at = 2

    def on_checkpoint(self, phase):
        super().on_checkpoint(phase)
        if phase == "unet" and self.state.step == self.stop_at:
            raise Interrupt


def test_tokenizer_round_trips_captions_and_pads_empty_prompt(tmp_path):
    tok = wt.build_tokenizer(16)
    ids = wt.tokenize(tok, world.all_prompts())
    assert ids.shape == (540, 16)
    for prompt, row in zip(world.all_prompts()[::37], ids[::37]):
        assert tok.decode(row, skip_special_tokens=True) == prompt
        assert row[0] == tok.bos_token_id and tok.eos_token_id in row.tolist()
    empty = wt.tokenize(tok, [""])[0].tolist()
    assert empty[:2] == [tok.bos_token_id, tok.eos_token_id]
    assert empty[2:] == [tok.pad_token_id] * 14
    assert tok.unk_token_id in tok("a dragon").input_ids
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.model_max_length == 16
    assert torch.equal(wt.tokenize(again, world.all_prompts()), ids)


def test_tiny_components_build_with_sd_shapes(tmp_path):
    cfg = tiny_config(tmp_path)
    parts = wt.Components.build(cfg)
    x = torch.zeros(2, 3, 32, 32)
    z = parts.vae.encode(x).latent_dist.mean
    assert z.shape == (2, 4, 8, 8)
    assert parts.vae.decode(z).sample.shape == (2, 3, 32, 32)
    ids = wt.tokenize(parts.tokenizer, ["a small red circle in the center on a black background", ""])
    context = parts.text_encoder(ids)[0]
    assert context.shape == (2, 16, 32)
    assert parts.unet(z, torch.tensor([10, 999]), encoder_hidden_states=context).sample.shape == z.shape


def test_unet_cross_attention_only_at_8x8_and_4x4():
    unet = wt.build_unet(wt.UNetConfig((16, 32, 32), norm_num_groups=8), latent_channels=4, cross_attention_dim=32)
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    out = unet(torch.zeros(1, 4, 8, 8), 500, encoder_hidden_states=torch.zeros(1, 16, 32)).sample
    assert out.shape == (1, 4, 8, 8)


def test_scheduler_is_sd_scaled_linear():
    sched = wt.build_scheduler("ddpm")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sched.betas.double(), betas, atol=1e-7)
    assert wt.build_scheduler().config.prediction_type == "epsilon"
    with pytest.raises(LcmkitError):
        wt.build_scheduler("euler")


def test_a_few_steps_lower_the_vae_and_unet_losses(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path)
    parts = wt.Components.build(cfg)
    images, _ = world.sample(16, seed=3)
    x = wt.images_to_tensor(images)

    def vae_loss():
        return wt.vae_loss(parts.vae, x, torch.Generator().manual_seed(0), 1e-6, 0.1)[0]

    opt = torch.optim.Adam(parts.vae.parameters(), lr=3e-3)
    before = vae_loss().item()
    for _ in range(15):
        opt.zero_grad()
        vae_loss().backward()
        opt.step()
    assert vae_loss().item() < 0.8 * before

    z0 = torch.randn(16, 4, 8, 8)
    ids = wt.tokenize(parts.tokenizer, [world.caption(s) for s in world.eval_specs(16)])
    ac = wt.build_scheduler("ddpm").alphas_cumprod.float()

    def unet_loss():
        return wt.diffusion_loss(parts.unet, parts.text_encoder, z0, ids, ac, torch.Generator().manual_seed(0), 5.0)

    params = [*parts.unet.parameters(), *parts.text_encoder.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    before = unet_loss().item()
    for _ in range(15):
        opt.zero_grad()
        unet_loss().backward()
        opt.step()
    assert unet_loss().item() < 0.8 * before


def test_resume_continues_the_same_steps_and_losses(tmp_path):
    straight = wt.Trainer(tiny_config(tmp_path / "a"), progress=False)
    straight.run()

    with pytest.raises(Interrupt):
        InterruptedTrainer(tiny_config(tmp_path / "b"), progress=False).run()
    with pytest.raises(LcmkitError, match="--resume"):
        wt.Trainer(tiny_config(tmp_path / "b"), progress=False)
    resumed = wt.Trainer(tiny_config(tmp_path / "b"), resume=True, progress=False)
    assert (resumed.state.phase, resumed.state.step) == ("unet", 2)
    resumed.run()

    assert len(resumed.state.losses["unet"]) == 4
    for phase in ("vae", "decoder", "unet"):
        assert resumed.state.losses[phase] == pytest.approx(straight.state.losses[phase], rel=1e-5)
    summary = json.loads((tmp_path / "b" / "training.json").read_text())
    assert summary["seconds"]["unet"] > 0 and summary["parameters"]["unet"] > 0
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0


def test_saved_folder_loads_offline_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    folder = wt.Trainer(tiny_config(tmp_path, unet_steps=2, vae_decoder_steps=0), progress=False).run()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    assert list(folder.glob("unet/*.safetensors")) and not list(folder.rglob("*.bin"))

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.vae.config.scaling_factor != 1.0
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a large blue square in the top left on a white background"], num_inference_steps=2,
               guidance_scale=7.5, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and out.min() >= 0 and out.max() <= 1


def test_config_validation_and_cli_parser():
    with pytest.raises(LcmkitError, match="caption_dropout"):
        wt.TrainConfig(caption_dropout=1.5)
    assert wt.TrainConfig.from_dict({**wt.TrainConfig().to_dict(), "unknown": 1}).unet == wt.UNetConfig()
    from lcmkit.cli import build_parser

    args = build_parser().parse_args(["world", "train-teacher", "--out", "x", "--unet-steps", "7", "--resume"])
    assert args.unet_steps == 7 and args.resume and callable(args.run)


def test_init_from_a_teacher_trains_only_the_unet_on_open_captions(tmp_path, monkeypatch):
    source = wt.Trainer(tiny_config(tmp_path / "src", unet_steps=2, vae_decoder_steps=0), progress=False).run()
    seen = []
    loss = wt.diffusion_loss

    def recording(unet, text_encoder, z0, input_ids, *args):
        seen.extend(input_ids.tolist())
        return loss(unet, text_encoder, z0, input_ids, *args)

    monkeypatch.setattr(wt, "diffusion_loss", recording)
    with pytest.raises(LcmkitError, match="not a pipeline folder"):
        tiny_config(tmp_path / "x", init_from=str(tmp_path))
    cfg = tiny_config(tmp_path / "ft", init_from=str(source), open_captions=1.0, caption_dropout=0.0,
                      unet_steps=6, batch_size=16)
    trainer = wt.Trainer(cfg, progress=False)
    before_unet = {k: v.clone() for k, v in trainer.parts.unet.state_dict().items()}
    folder = trainer.run()

    assert trainer.state.losses["vae"] == [] and trainer.state.losses["decoder"] == []
    assert len(trainer.state.losses["unet"]) == 6
    from diffusers import AutoencoderKL, UNet2DConditionModel

    src_vae, new_vae = AutoencoderKL.from_pretrained(source / "vae"), AutoencoderKL.from_pretrained(folder / "vae")
    assert new_vae.config.scaling_factor == src_vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(src_vae.state_dict().values(), new_vae.state_dict().values()))
    new_unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert any(not torch.equal(before_unet[k], v) for k, v in new_unet.state_dict().items())

    tok = trainer.parts.tokenizer
    named = [world.parse_open_caption(tok.decode(ids, skip_special_tokens=True)) for ids in seen]
    counts = [len(n) for n in named]
    assert len(named) == 6 * 16 and min(counts) < 5 and sum(c == 5 for c in counts) < len(counts) / 3
