"""Z-Image: ``ZImageTransformer2DModel`` and ComfyUI's ``NextDiT`` (model config ``ZImage`` on
model_base ``Lumina2``).

ComfyUI 0.3.75 loads no diffusers Z-Image file, so the ComfyUI model comes from the host's class
and diffusers' converter makes the diffusers model of it. ComfyUI's detection knows Z-Image only
at its real width (3840: 30 heads, Z-Image's modulation and rope); the tiny one gets those
settings from ``detection_fix``. The width cannot go below 1024: ComfyUI's time embedder is
min(dim, 1024) wide inside, diffusers' always 1024. At that width diffusers' feed-forward is
int(8/3 * dim) = 2730 wide, which ComfyUI reproduces with ``multiple_of`` 2 (its default 256 rounds
up). One noise and one context refiner and no main block keep such a model quick (ComfyUI 0.28
detects Lumina 2 / Z-Image by a noise refiner's weight); the main blocks are the noise refiner's
kind of block (modulated) under another prefix. 0.3.75's ``NextDiT`` carries an unused
``norm_final`` that diffusers' converter drops.
"""

from __future__ import annotations

import torch

from . import Kit

DIM, HEADS, CAP_DIM, AXES = 1024, 8, 64, [32, 48, 48]
ZIMAGE = dict(n_heads=HEADS, n_kv_heads=HEADS, axes_dims=AXES, axes_lens=[1536, 512, 512], rope_theta=256.0,
              ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
              n_refiner_layers=1, multiple_of=2)


def _conditioning(kit, gen):
    make = lambda: [[torch.randn(1, 7, CAP_DIM, generator=gen), {}]]
    return make(), make()


KIT = Kit(
    family="z_image",
    comfy_class="ZImage",
    diffusers_class="ZImageTransformer2DModel",
    diffusers_config=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=DIM, n_layers=0,
                          n_refiner_layers=1, n_heads=HEADS, n_kv_heads=HEADS, qk_norm=True, cap_feat_dim=CAP_DIM,
                          rope_theta=256.0, t_scale=1000.0, axes_dims=AXES, axes_lens=[1536, 512, 512]),
    direction="comfy",
    comfy_sizes=dict(patch_size=2, in_channels=16, dim=DIM, n_layers=0, qk_norm=True, cap_feat_dim=CAP_DIM, **ZIMAGE),
    detection_fix=lambda detected: dict(ZIMAGE),
    converter="convert_z_image_transformer_checkpoint_to_diffusers",
    comfy_only=("norm_final.",),
    conditioning=_conditioning,
    latent_shape=(1, 16, 8, 8),
    presets={"generic": ["Attention", "FeedForward"]},
)
