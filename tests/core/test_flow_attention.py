"""Collapsed joint attention: n identical context tokens weigh as one token with its logits raised by log n."""

from __future__ import annotations

import pytest
import torch

from lcmkit.flow_attention import collapse_zero_tokens, collapsed_attention


def test_collapsed_zero_tail_gives_the_full_contexts_output_in_float64():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=4, qk_norm="rms_norm",
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([300.0, 800.0], dtype=torch.float64)
    context = torch.cat([torch.randn(2, 5, 32, generator=g, dtype=torch.float64),
                         torch.zeros(2, 256, 32, dtype=torch.float64)], dim=1)
    pooled = torch.randn(2, 16, generator=g, dtype=torch.float64)
    original = dict(transformer.attn_processors)
    full = transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled).sample
    short, multiplicity = collapse_zero_tokens(context, 5)
    assert short.shape[1] == 6 and multiplicity.tolist() == [1, 1, 1, 1, 1, 256]
    with collapsed_attention(transformer):
        collapsed = transformer(hidden_states=x, timestep=t, encoder_hidden_states=short, pooled_projections=pooled,
                                joint_attention_kwargs={"context_multiplicity": multiplicity}).sample
        plain = transformer(hidden_states=x, timestep=t, encoder_hidden_states=context,
                            pooled_projections=pooled).sample
    torch.testing.assert_close(collapsed, full, atol=1e-12, rtol=1e-10)
    assert torch.equal(plain, full)  # without a multiplicity it is diffusers' joint attention
    assert {k: type(v) for k, v in transformer.attn_processors.items()} == {k: type(v) for k, v in original.items()}
    # dropping the tail without its multiplicity changes the output: the test can fail
    assert not torch.allclose(transformer(hidden_states=x, timestep=t, encoder_hidden_states=short,
                                          pooled_projections=pooled).sample, full, atol=1e-6)


def test_a_tail_that_is_not_zero_is_refused():
    with pytest.raises(ValueError, match="not all zero"):
        collapse_zero_tokens(torch.ones(1, 4, 8), 2)
