"""Flux.1: ``FluxTransformer2DModel`` through ComfyUI's own diffusers conversion and detection.

ComfyUI's detection takes every size from the file but the head count (24, real Flux's): the
tiny model keeps real Flux's head width (128, the rotary axes' sum) and two heads.
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
    family="flux",
    comfy_class="Flux",
    diffusers_class="FluxTransformer2DModel",
    diffusers_config=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                          num_attention_heads=2, joint_attention_dim=CONTEXT_DIM, pooled_projection_dim=POOLED_DIM,
                          guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    direction="diffusers",
    detection_fix=lambda cfg: {"num_heads": cfg["hidden_size"] // 128},
    conditioning=conditioning,
    latent_shape=(1, 16, 8, 8),
    presets={"generic": ["Attention", "FeedForward"], "family": ["FluxAttention", "FeedForward"]},
)
