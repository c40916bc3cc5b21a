"""A diffusers-named copy of a ComfyUI model's linear layers, for lycoris-lora to wrap.

SimpleTuner trains T-LoRA with lycoris-lora on diffusers models, so its files name modules by
diffusers paths (``lycoris_transformer_blocks_0_attn_to_q``). This builds an ``nn.Module`` tree
with exactly those paths whose ``nn.Linear`` weights are the ComfyUI model's weights (the right
slice of a fused qkv / linear1), using ComfyUI's own diffusers maps (``comfy.utils``). Containers
named ``attn*`` / ``ff*`` get the classes ``Attention`` / ``FeedForward``, so SimpleTuner's default
preset (``target_module: ["Attention", "FeedForward"]``) selects the same layers it selects on the
real diffusers model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Attention(nn.Module):
    pass


class FeedForward(nn.Module):
    pass


class Container(nn.Module):
    pass


def _container_class(segment: str):
    if segment.startswith("attn"):
        return Attention
    if segment.startswith("ff"):
        return FeedForward
    return Container


@dataclass
class DiffusersCopy:
    root: nn.Module
    # diffusers module path -> (ComfyUI weight key, (dim, offset, size) or None)
    targets: dict


def diffusers_map(model) -> dict:
    """diffusers weight key -> ComfyUI state-dict key (or (key, (dim, offset, size)))."""
    import comfy.model_base
    import comfy.utils

    cfg = model.model_config.unet_config
    if isinstance(model, comfy.model_base.Flux):
        return comfy.utils.flux_to_diffusers(cfg, output_prefix="diffusion_model.")
    return {k: "diffusion_model." + v for k, v in comfy.utils.unet_to_diffusers(cfg).items()}


def diffusers_copy(model_patcher) -> DiffusersCopy:
    model = model_patcher.model
    sd = model.state_dict()
    root = Container()
    targets = {}
    for dkey, target in sorted(diffusers_map(model).items()):
        if not dkey.endswith(".weight"):
            continue
        if isinstance(target, str):
            target = (target, None)
        if len(target) > 2:
            continue  # a function target (e.g. Flux's swapped adaLN halves): not a plain linear
        key, piece = target
        weight = sd.get(key)
        if weight is None or weight.ndim != 2:
            continue  # absent in this config, norms, convs: not T-LoRA targets here
        if piece is not None:
            dim, offset, size = piece
            weight = weight.narrow(dim, offset, size)
        path = dkey[: -len(".weight")]
        parent = root
        segments = path.split(".")
        for seg in segments[:-1]:
            if not hasattr(parent, seg):
                parent.add_module(seg, _container_class(seg)())
            parent = getattr(parent, seg)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight.float())
        parent.add_module(segments[-1], linear)
        targets[path] = (key, piece)
    return DiffusersCopy(root, targets)
