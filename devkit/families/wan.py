"""Wan 2.1 / 2.2 text-to-video: ``WanTransformer3DModel`` and ComfyUI's ``WanModel``.

ComfyUI has no diffusers conversion for Wan: the ComfyUI model comes from the host's class (its
detection fixes the head width at 128 and the time / text widths at 256 / 4096), and diffusers'
own converter makes the diffusers model of it.
"""

from __future__ import annotations

import torch

from . import Kit


def _conditioning(kit, gen):
    make = lambda: [[torch.randn(1, 7, 4096, generator=gen), {}]]
    return make(), make()


KIT = Kit(
    family="wan",
    comfy_class="WAN21_T2V",
    diffusers_class="WanTransformer3DModel",
    diffusers_config=dict(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
                          text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=2),
    direction="comfy",
    comfy_sizes=dict(image_model="wan2.1", model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2,
                     in_dim=16, out_dim=16),
    converter="convert_wan_transformer_to_diffusers",
    conditioning=_conditioning,
    latent_shape=(1, 16, 3, 8, 8),
    presets={"generic": ["Attention", "FeedForward"], "family": ["WanAttention", "FeedForward"]},
    video=True,
)
