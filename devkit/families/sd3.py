"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` through ComfyUI's own diffusers conversion
(``convert_diffusers_mmdit``) and detection.

ComfyUI's detection derives the depth from the width (hidden = 64 * depth, one 64-wide head per
block) and builds that many blocks, so the tiny model has as many layers as heads of width 64.
SD3.5's extras are on: RMS q/k norms and a second self-attention (MMDiT-X) in block 0.
"""

from __future__ import annotations

import torch

from . import Kit

CONTEXT_DIM, POOLED_DIM = 64, 32


def conditioning(kit, gen, batch: int = 1, tokens: int = 8):
    make = lambda: [[torch.randn(batch, tokens, CONTEXT_DIM, generator=gen),
                     {"pooled_output": torch.randn(batch, POOLED_DIM, generator=gen)}]]
    return make(), make()


KIT = Kit(
    family="sd3",
    comfy_class="SD3",
    diffusers_class="SD3Transformer2DModel",
    diffusers_config=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                          attention_head_dim=64, num_attention_heads=2, joint_attention_dim=CONTEXT_DIM,
                          caption_projection_dim=128, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16,
                          dual_attention_layers=(0,), qk_norm="rms_norm"),
    direction="diffusers",
    conditioning=conditioning,
    latent_shape=(1, 16, 8, 8),
    presets={"generic": ["Attention", "FeedForward"]},
)
