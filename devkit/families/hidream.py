"""HiDream-I1: ``HiDreamImageTransformer2DModel``; ComfyUI's layout is diffusers' own, so ComfyUI
loads the diffusers state dict as it is.

ComfyUI's detection derives no size at all (20 heads of 128, 16 + 32 blocks, 4 experts, the
text widths of the real model): the tiny model sets them from the diffusers config.
SimpleTuner's own HiDream classes are named ``Attention`` / ``FeedForward`` / ``MOEFeedForward``
(its generic preset wraps every attention and feed-forward layer); diffusers' are
``HiDreamAttention`` / ``HiDreamImageFeedForwardSwiGLU`` / ``MOEFeedForwardSwiGLU``, which the
generic preset does not match, so the same layers are wrapped here by diffusers' class names.
"""

from __future__ import annotations

import torch

from . import Kit

T5_DIM, LLAMA_DIM, POOLED_DIM = 64, 32, 32
SIZES = dict(num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
             caption_channels=[T5_DIM, LLAMA_DIM], text_emb_dim=POOLED_DIM, num_routed_experts=2,
             num_activated_experts=1, axes_dims_rope=(32, 16, 16), llama_layers=[0, 1])


def _conditioning(kit, gen):
    def make():
        return [[torch.randn(1, 7, T5_DIM, generator=gen),
                 {"pooled_output": torch.randn(1, POOLED_DIM, generator=gen),
                  "conditioning_llama3": torch.randn(1, 2, 5, LLAMA_DIM, generator=gen)}]]
    return make(), make()


KIT = Kit(
    family="hidream",
    comfy_class="HiDream",
    diffusers_class="HiDreamImageTransformer2DModel",
    diffusers_config=dict(patch_size=2, in_channels=16, out_channels=16, max_resolution=(128, 128), **SIZES),
    direction="diffusers",
    detection_fix=lambda detected: dict(SIZES),
    conditioning=_conditioning,
    latent_shape=(1, 16, 8, 8),
    presets={"family": ["HiDreamAttention", "HiDreamImageFeedForwardSwiGLU", "MOEFeedForwardSwiGLU"]},
)
