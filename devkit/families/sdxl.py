"""SDXL: diffusers' ``UNet2DConditionModel`` and ComfyUI's ldm UNet (discrete eps sampling).

ComfyUI's detection derives every size of an ldm UNet from the file, but its match table knows
real SDXL sizes only: the tiny model is built from the host's SDXL config class with the sizes its
detection derived; diffusers' own ldm converter makes the diffusers model of it.
"""

from __future__ import annotations

import torch

from . import Kit

DIFFUSERS = dict(sample_size=32, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
                 transformer_layers_per_block=1, cross_attention_dim=64, attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# the ldm UNet's own arguments (an ldm UNet has no defaults): ComfyUI's detection then derives the
# config the test model is built with from the weights
COMFY = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
             num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=32, num_res_blocks=[1, 1],
             transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], channel_mult=[1, 2],
             transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=64, num_head_channels=16,
             use_temporal_attention=False, use_temporal_resblock=False)


def ldm_converter(diffusers_config: dict):
    """diffusers' own ldm -> diffusers UNet converter for a UNet of this diffusers config."""

    def convert(sd: dict) -> dict:
        from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

        return convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v for k, v in sd.items()}, dict(diffusers_config))

    return convert


def conditioning(kit, gen, batch: int = 1, tokens: int = 8):
    def make():
        return [[torch.randn(batch, tokens, 64, generator=gen),
                 {"pooled_output": torch.randn(batch, 1280, generator=gen), "width": 64, "height": 64,
                  "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}]]

    return make(), make()


def discrete_sigmas(model):
    ms = model.model.model_sampling
    return [float(ms.sigma(torch.tensor(float(t)))) for t in (999, 800, 600, 400, 200, 20)]


def scheduler_timestep(model_sampling, sigma):
    """SimpleTuner's discrete families mask at the scheduler's integer timestep."""
    return float(model_sampling.timestep(torch.tensor([float(sigma)]))[0])


KIT = Kit(
    family="sdxl",
    comfy_class="SDXL",
    diffusers_class="UNet2DConditionModel",
    diffusers_config=DIFFUSERS,
    direction="comfy",
    comfy_sizes=COMFY,
    converter=ldm_converter(DIFFUSERS),
    conditioning=conditioning,
    latent_shape=(1, 4, 8, 8),
    sigmas=discrete_sigmas,
    simpletuner_t=scheduler_timestep,
)
