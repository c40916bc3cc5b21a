"""Lumina Image 2.0: ``Lumina2Transformer2DModel`` and ComfyUI's ``NextDiT`` (model config
``Lumina2``).

ComfyUI loads no diffusers Lumina 2 file, so the ComfyUI model comes from the host's class and
diffusers' converter makes the diffusers model of it. ComfyUI's detection knows Lumina 2's heads,
rope and feed-forward width only at its real width (2304); the tiny one gets them from
``detection_fix``. diffusers' converter splits the fused qkv at the real widths (2304 / 768 / 768,
24 query and 8 kv heads of 96): here it runs with those two numbers set to the tiny model's
(4 query and 2 kv heads of 48), its code otherwise as diffusers ships it. 0.3.75's ``NextDiT``
carries an unused ``norm_final`` that the converter drops.
"""

from __future__ import annotations

import torch

from . import Kit, with_split_sizes

DIM, HEADS, KV_HEADS, CAP_DIM, AXES = 192, 4, 2, 64, [16, 16, 16]
LUMINA2 = dict(n_heads=HEADS, n_kv_heads=KV_HEADS, axes_dims=AXES, axes_lens=[300, 512, 512], rope_theta=10000.0,
               ffn_dim_multiplier=4.0)


def _converter(sd: dict) -> dict:
    """diffusers' Lumina 2 converter, whose qkv split hard-codes real Lumina 2's widths (q 2304,
    k = v 768: 24 query and 8 key/value heads of 96), at the tiny model's (``with_split_sizes``)."""
    from diffusers.loaders import single_file_utils

    head = DIM // HEADS
    convert = with_split_sizes(single_file_utils.convert_lumina2_to_diffusers,
                               {(2304, 768, 768): (HEADS * head, KV_HEADS * head, KV_HEADS * head)})
    return convert(sd)


def _conditioning(kit, gen):
    make = lambda: [[torch.randn(1, 7, CAP_DIM, generator=gen), {}]]
    return make(), make()


KIT = Kit(
    family="lumina2",
    comfy_class="Lumina2",
    diffusers_class="Lumina2Transformer2DModel",
    diffusers_config=dict(sample_size=16, patch_size=2, in_channels=16, hidden_size=DIM, num_layers=1,
                          num_refiner_layers=2, num_attention_heads=HEADS, num_kv_heads=KV_HEADS,
                          axes_dim_rope=tuple(AXES), axes_lens=(300, 512, 512), cap_feat_dim=CAP_DIM),
    direction="comfy",
    comfy_sizes=dict(patch_size=2, in_channels=16, dim=DIM, n_layers=1, qk_norm=True, cap_feat_dim=CAP_DIM, **LUMINA2),
    detection_fix=lambda detected: dict(LUMINA2),
    converter=_converter,
    comfy_only=("norm_final.",),
    conditioning=_conditioning,
    latent_shape=(1, 16, 8, 8),
    presets={"generic": ["Attention", "FeedForward"], "family": ["Attention", "LuminaFeedForward"]},
)
