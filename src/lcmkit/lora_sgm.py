"""The original checkpoint layout of an SD-family UNet (CompVis LDM for SD 1.x/2.x, Stability's SGM for SDXL) and
its diffusers module names, one for one.

Single-file checkpoints, ComfyUI, Forge, AUTOMATIC1111 and kohya's sd-scripts (for SDXL) name UNet layers as the
original code did: ``input_blocks.N.M``, ``middle_block.N``, ``output_blocks.N.M``, ``time_embed``, ``label_emb``,
``out``. :func:`original_names` maps every module of a diffusers ``UNet2DConditionModel`` to that name, walking the
model's own blocks (how many resnets each has, whether it has attentions, a down- or upsampler), so it holds for
any layers-per-block and block layout, not only SD 1.5 and SDXL. The facts it encodes (docs/lora-formats.md):

- ``conv_in`` = ``input_blocks.0.0``; ``time_embedding.linear_{1,2}`` = ``time_embed.{0,2}``;
  ``add_embedding`` / ``class_embedding.linear_{1,2}`` = ``label_emb.0.{0,2}``; ``conv_norm_out`` = ``out.0``,
  ``conv_out`` = ``out.2``;
- the input blocks are numbered from 1 over every down block's (resnet j, attention j) pairs, then its
  downsampler: resnet → ``input_blocks.N.0``, attention → ``input_blocks.N.1``, ``downsamplers.0.conv`` →
  ``input_blocks.N.0.op``;
- ``mid_block``: resnet 0, attention 0, resnet 1 = ``middle_block.0``, ``.1``, ``.2``;
- the output blocks are numbered from 0 over every up block's (resnet j, attention j): ``output_blocks.N.0`` and
  ``.1``; ``upsamplers.0.conv`` joins the block's last N as ``output_blocks.N.1.conv`` (no attentions, SD 1.x's
  first up block) or ``output_blocks.N.2.conv``;
- inside a resnet: ``norm1``/``conv1``/``time_emb_proj``/``norm2``/``conv2``/``conv_shortcut`` =
  ``in_layers.0``/``in_layers.2``/``emb_layers.1``/``out_layers.0``/``out_layers.3``/``skip_connection``; inside
  an attention (``proj_in``, ``transformer_blocks.K.attn1.to_q``, ``ff.net.0.proj`` …) the names are the same.

Tested against diffusers' own original → diffusers converter (``convert_ldm_unet_checkpoint``) on SD 1.5 and SDXL:
a state dict renamed with this map converts back to exactly the diffusers state dict (tests/core/test_lora_clients.py).
"""

from __future__ import annotations

from torch import nn

#: diffusers resnet member → original ``ResBlock`` member
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
#: fixed top-level modules, diffusers → original
TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
             "class_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _count(blocks, name: str) -> int:
    part = getattr(blocks, name, None)
    return len(part) if part is not None else 0


def block_prefixes(unet: nn.Module) -> dict[str, tuple[str, bool]]:
    """diffusers block prefix → (original prefix, is a resnet) for every resnet, attention, down- and upsampler
    conv and fixed top-level module of ``unet`` (a diffusers ``UNet2DConditionModel``)."""
    out: dict[str, tuple[str, bool]] = {}
    n = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        for j in range(_count(block, "resnets")):
            out[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", True)
            if j < _count(block, "attentions"):
                out[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", False)
            n += 1
        if _count(block, "downsamplers"):
            out[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", False)
            n += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None:  # resnet 0, then (attention k, resnet k + 1) pairs
        out["mid_block.resnets.0"] = ("middle_block.0", True)
        for k in range(_count(mid, "attentions")):
            out[f"mid_block.attentions.{k}"] = (f"middle_block.{2 * k + 1}", False)
            out[f"mid_block.resnets.{k + 1}"] = (f"middle_block.{2 * k + 2}", True)
        if not _count(mid, "attentions") and _count(mid, "resnets") > 1:
            out["mid_block.resnets.1"] = ("middle_block.1", True)
    n = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = _count(block, "attentions")
        for j in range(_count(block, "resnets")):
            out[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", True)
            if j < attentions:
                out[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{n}.1", False)
            n += 1
        if _count(block, "upsamplers"):
            out[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{n - 1}.{2 if attentions else 1}.conv", False)
    out.update({k: (v, False) for k, v in TOP_LEVEL.items()})
    return out


def original_names(unet: nn.Module) -> dict[str, str]:
    """Every module path of ``unet`` that has an original-layout name → that name (``down_blocks.1.attentions.0.
    proj_in`` → ``input_blocks.4.1.proj_in``; ``down_blocks.0.resnets.0.conv1`` → ``input_blocks.1.0.in_layers.2``).
    Empty for a model that is not a diffusers SD-family UNet (no ``down_blocks``/``up_blocks``)."""
    if not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")):
        return {}
    # lcmkit's own map: diffusers has none from diffusers to original names, and its reader
    # (_maybe_map_sgm_blocks_to_diffusers) drops the SGM keys of mixed files and takes SD 1.x's output_blocks.2.1.conv
    # upsampler for an attention
    prefixes = block_prefixes(unet)
    names: dict[str, str] = {}
    for path, _ in unet.named_modules():
        # the longest mapped prefix this path starts with (``downsamplers.0.conv`` is a whole path)
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in prefixes:
                original, is_resnet = prefixes[head]
                rest = parts[cut:]
                if is_resnet and rest:
                    member = RESNET_NAMES.get(rest[0])
                    if member is None:  # a resnet member the original layout does not have
                        break
                    rest = [member, *rest[1:]]
                names[path] = ".".join([original, *rest])
                break
    return names
