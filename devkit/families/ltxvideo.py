"""LTX-Video 0.9.x text-to-video: ``LTXVideoTransformer3DModel`` and ComfyUI's ``LTXVModel``.

ComfyUI does not load diffusers-format LTX files itself (its detection looks for the original
``adaln_single`` names), so the ComfyUI model comes from the host's class and diffusers' own
converter makes the diffusers model of it. ComfyUI's detection fixes 32 heads (the head width is
``attn2.to_k``'s rows / 32) and never reads the input or caption widths, so those stay at the
host's defaults (128 latent channels, 4096 T5 features); the text context must be as wide as the
blocks (the caption projection's output is attn2's context).
"""

from __future__ import annotations

import torch

from . import Kit


def _conditioning(kit, gen):
    # as ComfyUI's T5 encoder gives LTXV conditioning: the token mask with it (the model needs one);
    # the last two tokens padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    make = lambda: [[torch.randn(1, 7, 4096, generator=gen), {"attention_mask": mask}]]
    return make(), make()


KIT = Kit(
    family="ltxvideo",
    comfy_class="LTXV",
    diffusers_class="LTXVideoTransformer3DModel",
    diffusers_config=dict(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=8,
                          cross_attention_dim=256, num_layers=2, caption_channels=4096),
    direction="comfy",
    comfy_sizes=dict(image_model="ltxv", num_layers=2, attention_head_dim=8, cross_attention_dim=256),
    converter="convert_ltx_transformer_checkpoint_to_diffusers",
    conditioning=_conditioning,
    latent_shape=(1, 128, 3, 4, 4),
    presets={"generic": ["Attention", "FeedForward"], "family": ["LTXAttention", "FeedForward"]},
    video=True,
)
