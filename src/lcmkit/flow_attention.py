"""Joint attention with repeated context tokens collapsed: the same output, a fraction of the cost.

SD3 without T5 fills the T5 half of its context with ``max_sequence_length`` (256 by default) all-zero embeddings.
Those tokens are identical at the transformer's input and stay identical through every block (no positional
embedding on the context; each token's query, key, value, feed-forward and AdaLN modulation are the same function
of the same vector), so in softmax attention n copies of one key k with value v weigh exactly as one copy whose logit
is raised by log n:

    Σ_j exp(q·k_j)·v_j over n copies = exp(q·k + log n)·v.

:class:`CollapsedJointAttnProcessor` computes SD3's joint attention (image and context queries, keys and values
concatenated, one scaled-dot-product attention, split back) with an additive key bias log m_j for context token j of
multiplicity m_j, given through ``joint_attention_kwargs={"context_multiplicity": m}``. The transformer is then called
with each distinct token once: for SD3 without T5, the CLIP tokens and one zero token of multiplicity 256 (272
context tokens become 17). Without ``context_multiplicity`` it is plain joint attention.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor


class CollapsedJointAttnProcessor:
    """SD3 joint attention with an optional per-context-token multiplicity (see the module docstring)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, context_multiplicity: Tensor | None = None) -> Tensor:
        batch, n_image = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: Tensor) -> Tensor:  # (B, L, H·D) -> (B, H, L, D)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
            heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = None
        if encoder_hidden_states is not None:
            c_query, c_key, c_value = (heads(attn.add_q_proj(encoder_hidden_states)),
                                       heads(attn.add_k_proj(encoder_hidden_states)),
                                       heads(attn.add_v_proj(encoder_hidden_states)))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query, key, value = (torch.cat([query, c_query], dim=2), torch.cat([key, c_key], dim=2),
                                 torch.cat([value, c_value], dim=2))
            if context_multiplicity is not None:
                log_m = context_multiplicity.to(device=query.device, dtype=query.dtype).log()
                bias = torch.cat([log_m.new_zeros(n_image), log_m]).view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


@contextlib.contextmanager
def collapsed_attention(transformer):
    """Within the block, ``transformer``'s attention layers run :class:`CollapsedJointAttnProcessor`; their own
    processors are put back on exit."""
    original = transformer.attn_processors
    transformer.set_attn_processor(CollapsedJointAttnProcessor())
    try:
        yield transformer
    finally:
        transformer.set_attn_processor(original)


def collapse_zero_tokens(embeds: Tensor, n_distinct: int) -> tuple[Tensor, Tensor]:
    """``(embeds[:, :n_distinct + 1], multiplicity)``: the first ``n_distinct`` context tokens once each and the
    all-zero tail (checked to be zero) as one token counted ``L − n_distinct`` times."""
    tail = embeds[:, n_distinct:]
    if tail.shape[1] == 0:
        return embeds, torch.ones(embeds.shape[1], device=embeds.device)
    if tail.abs().amax() != 0:
        raise ValueError("the context tokens after the first n_distinct are not all zero; they cannot be collapsed")
    multiplicity = torch.ones(n_distinct + 1, device=embeds.device)
    multiplicity[-1] = tail.shape[1]
    return embeds[:, :n_distinct + 1], multiplicity
