"""Stable Diffusion 1.x: the SDXL kit's UNet without SDXL's size conditioning (a plain
``UNet2DConditionModel`` / ldm UNet, discrete eps sampling)."""

from __future__ import annotations

import torch

from . import Kit
from .sdxl import COMFY, DIFFUSERS, discrete_sigmas, ldm_converter, scheduler_timestep

DIFFUSERS_SD1 = {**{k: v for k, v in DIFFUSERS.items()
                    if k not in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")},
                 "use_linear_projection": False}
COMFY_SD1 = {**{k: v for k, v in COMFY.items() if k not in ("adm_in_channels", "num_classes")},
             "use_linear_in_transformer": False}


def conditioning(kit, gen, batch: int = 1, tokens: int = 8):
    make = lambda: [[torch.randn(batch, tokens, 64, generator=gen), {}]]
    return make(), make()


KIT = Kit(
    family="sd1x",
    comfy_class="SD15",
    diffusers_class="UNet2DConditionModel",
    diffusers_config=DIFFUSERS_SD1,
    direction="comfy",
    comfy_sizes=COMFY_SD1,
    converter=ldm_converter(DIFFUSERS_SD1),
    conditioning=conditioning,
    latent_shape=(1, 4, 8, 8),
    sigmas=discrete_sigmas,
    simpletuner_t=scheduler_timestep,
)
