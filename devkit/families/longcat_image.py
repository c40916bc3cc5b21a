"""LongCat-Image: ``LongCatImageTransformer2DModel`` and ComfyUI's ``LongCatImage`` (ComfyUI 0.28+:
the Flux model with a 3584-wide text input, no vector or guidance input, 2-axis text positions).

LongCat's diffusers layout is Flux.1's but for the time embedding's name (``time_embed`` where
diffusers' Flux has ``time_text_embed``), so ComfyUI's own Flux conversion loads it once that one
name is Flux's (without it ComfyUI 0.28 leaves the time embedding unloaded). The sizes keep what
ComfyUI's detection needs to tell LongCat from Flux: text width 3584, head width 128.
"""

from __future__ import annotations

import torch

from . import Kit

CONTEXT_DIM = 3584


def conditioning(kit, gen, tokens: int = 8):
    make = lambda: [[torch.randn(1, tokens, CONTEXT_DIM, generator=gen), {}]]
    return make(), make()


KIT = Kit(
    family="longcat_image",
    comfy_class="LongCatImage",
    diffusers_class="LongCatImageTransformer2DModel",
    diffusers_config=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                          num_attention_heads=2, joint_attention_dim=CONTEXT_DIM, pooled_projection_dim=CONTEXT_DIM,
                          axes_dims_rope=[16, 56, 56]),
    direction="diffusers",
    diffusers_renames=(("time_embed.timestep_embedder.", "time_text_embed.timestep_embedder."),),
    # decayed spectra in the time embedding and the modulations would shrink the gates and the
    # adapter's effect to ~1e-4 of the output, near fp32 rounding (see Kit.keep_init)
    keep_init=("time_embed", "transformer_blocks.0.norm1", "single_transformer_blocks.0.norm", "norm_out"),
    conditioning=conditioning,
    latent_shape=(1, 16, 8, 8),
    # diffusers' LongCat attention class is LongCatImageAttention (SimpleTuner's vendored model uses
    # diffusers' FluxAttention at the same paths): the generic preset wraps only the feed-forwards
    presets={"generic": ["Attention", "FeedForward"], "family": ["LongCatImageAttention", "FeedForward"]},
    min_host=(0, 28, 0),
)
