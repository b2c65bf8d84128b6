"""The flow-matching world teacher: its text encoding is the SD3 pipeline's, the loss falls, resume repeats the
same losses, and the saved folder is an ordinary StableDiffusion3Pipeline (tiny sizes, built on a tiny UNet
teacher's VAE)."""

from __future__ import annotations

import json

import pytest
import torch

from lcmkit.errors import LcmkitError
from lcmkit_world import flow_teacher as ft
from lcmkit_world import teacher as wt
from lcmkit_world.teacher_config import FlowTrainConfig, TextConfig, TransformerConfig

from test_world_teacher import Interrupt, one_thread, tiny_config  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def vae_source(tmp_path_factory):
    """A tiny UNet teacher folder: the flow teacher keeps its VAE and tokenizer."""
    out = tmp_path_factory.mktemp("source")
    torch.set_num_threads(1)
    return wt.Trainer(tiny_config(out, unet_steps=1, vae_decoder_steps=0), progress=False).run()


def flow_config(out, source, **overrides) -> FlowTrainConfig:
    base = dict(out=str(out), init_from=str(source), text=TextConfig(32, 2, 2, 64, 16),
                transformer=TransformerConfig(num_layers=2, num_heads=2, head_dim=8, patch_size=2),
                num_images=64, unet_steps=4, batch_size=8, checkpoint_every=2, warmup_steps=1, lr=1e-3)
    base.update(overrides)
    return FlowTrainConfig(**base)


class InterruptedFlowTrainer(ft.FlowTrainer):
    def on_checkpoint(self, phase):
        super().on_checkpoint(phase)
        if phase == "unet" and self.state.step == 2:
            raise Interrupt


def load_sd3(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_saved_folder_is_an_sd3_pipeline_with_the_kept_vae(tmp_path, vae_source, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    folder = ft.FlowTrainer(flow_config(tmp_path, vae_source, unet_steps=2, shift=2.0), progress=False).run()
    assert not list(folder.rglob("*.bin")) and list(folder.glob("transformer/*.safetensors"))
    pipe = load_sd3(folder)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 2.0
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0
    source_vae = AutoencoderKL.from_pretrained(vae_source / "vae")
    assert pipe.vae.config.scaling_factor == source_vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(source_vae.state_dict().values(), pipe.vae.state_dict().values()))
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and 0 <= image.min() <= image.max() <= 1
    summary = json.loads((tmp_path / "training.json").read_text())
    assert set(summary["parameters"]) == {"vae", "text_encoder", "text_encoder_2", "transformer"}


def test_training_text_encoding_and_collapsed_context_are_the_pipelines(tmp_path, vae_source):
    """The collapsed training context gives the transformer output the pipeline's 16 + 256-token context gives."""
    from lcmkit.flow_attention import collapsed_attention

    pipe = load_sd3(ft.FlowTrainer(flow_config(tmp_path, vae_source, unet_steps=1), progress=False).run())
    prompts = ["a small red circle", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    assert embeds.shape[1] == 16 + 256
    ids = wt.tokenize(pipe.tokenizer, prompts)
    context, multiplicity, ours_pooled = ft.sd3_text_embeddings((pipe.text_encoder, pipe.text_encoder_2), ids,
                                                                pipe.transformer.config.joint_attention_dim, 256)
    assert torch.equal(context, embeds[:, :17]) and torch.equal(ours_pooled, pooled)
    assert multiplicity.tolist() == [1.0] * 16 + [256.0]
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([250.0, 900.0])
    full = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
    with collapsed_attention(pipe.transformer):
        short = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled,
                                 joint_attention_kwargs={"context_multiplicity": multiplicity}).sample
    torch.testing.assert_close(short, full, atol=2e-5, rtol=1e-4)


def test_loss_falls_on_a_fixed_batch(tmp_path, vae_source):
    trainer = ft.FlowTrainer(flow_config(tmp_path, vae_source), progress=False)
    trainer.render()
    trainer.encode_latents()
    parts = trainer.parts
    z0 = trainer.latents[:8] * trainer.state.scaling_factor
    ids = trainer.input_ids[:8]
    encoders = (parts.text_encoder, parts.text_encoder_2)

    def loss():
        return ft.flow_matching_loss(parts.transformer, encoders, z0, ids, torch.Generator().manual_seed(1), 0.0,
                                     1.0, 256)

    before = loss().item()
    opt = torch.optim.AdamW(parts.trainable_parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.7 * before


def test_resume_repeats_the_uninterrupted_losses(tmp_path, vae_source):
    straight = ft.FlowTrainer(flow_config(tmp_path / "a", vae_source), progress=False)
    straight.run()
    with pytest.raises(Interrupt):
        InterruptedFlowTrainer(flow_config(tmp_path / "b", vae_source), progress=False).run()
    resumed = ft.FlowTrainer(flow_config(tmp_path / "b", vae_source), resume=True, progress=False)
    assert (resumed.state.phase, resumed.state.step) == ("unet", 2)
    resumed.run()
    assert resumed.state.losses["unet"] == pytest.approx(straight.state.losses["unet"], rel=1e-5)
    assert resumed.state.losses["vae"] == [] and len(resumed.state.losses["unet"]) == 4


def test_config_checks_and_cli(tmp_path, vae_source):
    with pytest.raises(LcmkitError, match="patch size"):
        flow_config(tmp_path, vae_source, transformer=TransformerConfig(patch_size=3))
    with pytest.raises(LcmkitError, match="not a pipeline folder"):
        flow_config(tmp_path, tmp_path)
    assert FlowTrainConfig.from_dict(flow_config(tmp_path, vae_source).to_dict()).transformer.num_layers == 2
    from lcmkit.cli import build_parser

    args = build_parser().parse_args(["world", "train-flow-teacher", "--out", "x", "--steps", "7", "--shift", "3"])
    assert args.steps == 7 and args.shift == 3.0 and callable(args.run)
