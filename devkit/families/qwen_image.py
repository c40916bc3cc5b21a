"""Qwen-Image: ``QwenImageTransformer2DModel``; ComfyUI's layout is diffusers' own, so ComfyUI
loads the diffusers state dict as it is.

ComfyUI's detection reads only the input width and the depth and hard-codes the real widths
(24 heads of 128, a 3584-wide text input): the tiny model sets those from the diffusers config.
"""

from __future__ import annotations

import torch

from . import Kit

HEADS, HEAD_DIM, CONTEXT_DIM, AXES = 2, 64, 64, (16, 24, 24)


def _conditioning(kit, gen):
    make = lambda: [[torch.randn(1, 7, CONTEXT_DIM, generator=gen), {}]]
    return make(), make()


KIT = Kit(
    family="qwen_image",
    comfy_class="QwenImage",
    diffusers_class="QwenImageTransformer2DModel",
    diffusers_config=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=HEAD_DIM,
                          num_attention_heads=HEADS, joint_attention_dim=CONTEXT_DIM, axes_dims_rope=AXES),
    direction="diffusers",
    detection_fix=lambda detected: dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                        joint_attention_dim=CONTEXT_DIM, axes_dims_rope=AXES),
    conditioning=_conditioning,
    latent_shape=(1, 16, 1, 8, 8),
    presets={"generic": ["Attention", "FeedForward"]},
)
