"""Stable Cascade stage C (the prior): diffusers ``StableCascadeUNet`` and ComfyUI's ``StageC``.

ComfyUI's detection knows only the two real stage C sizes (by the text mapper's width) and keeps
``StageC``'s defaults otherwise, so the tiny model's sizes are given to it (``detection_fix``).
ComfyUI stores each attention's q / k / v apart (it splits the original files' fused ``in_proj``
on load); diffusers' converter reads the original layout, so they are fused back for it.

SimpleTuner trains stage C as a discrete DDPM model (integer t in 0..999, the model given the ratio
t / 999); ComfyUI samples it with the Würstchen cosine schedule and gives the model the ratio
``model_sampling.timestep(sigma)``: the mask timestep is the step of that ratio, 999 * ratio.
"""

from __future__ import annotations

import torch

from . import Kit

COND, TEXT, POOLED, IMAGE = 64, 32, 32, 768  # ComfyUI's stage C gets 768-wide (zero) image embeddings
SIZES = dict(c_cond=COND, c_hidden=[64, 128], nhead=[2, 2], blocks=[[1, 2], [2, 1]], block_repeat=[[1, 1], [1, 1]],
             c_clip_text=TEXT, c_clip_text_pooled=POOLED, c_clip_img=IMAGE)


def _to_diffusers(sd: dict) -> dict:
    """ComfyUI's layout -> the original file layout (q / k / v fused into ``in_proj``) -> diffusers'
    own converter."""
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

    original = {}
    for key, t in sd.items():
        head, sep, tail = key.rpartition(".attn.to_")
        if not sep:
            original[key] = t
        elif tail.startswith("q."):
            end = tail[2:]
            original[f"{head}.attn.in_proj_{end}"] = torch.cat([sd[f"{head}.attn.to_{p}.{end}"] for p in "qkv"])
    return convert_stable_cascade_unet_single_file_to_diffusers(original)


def conditioning(kit, gen, batch: int = 1, tokens: int = 8):
    make = lambda: [[torch.randn(batch, tokens, TEXT, generator=gen),
                     {"pooled_output": torch.randn(batch, 1, POOLED, generator=gen)}]]
    return make(), make()


def sigmas(model):
    ms = model.model.model_sampling
    return [float(ms.sigma(torch.tensor(r))) for r in (0.999, 0.8, 0.6, 0.4, 0.2, 0.02)]


def simpletuner_t(model_sampling, sigma):
    # SimpleTuner's stage C sees timestep_ratio = t / (num_train_timesteps - 1) and masks with int(t)
    return 999.0 * float(model_sampling.timestep(torch.tensor(float(sigma))))


KIT = Kit(
    family="stable_cascade",
    comfy_class="Stable_Cascade_C",
    diffusers_class="StableCascadeUNet",
    diffusers_config=dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1,
                          conditioning_dim=COND, block_out_channels=(64, 128), num_attention_heads=(2, 2),
                          down_num_layers_per_block=(1, 2), up_num_layers_per_block=(2, 1),
                          down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
                          clip_text_in_channels=TEXT, clip_text_pooled_in_channels=POOLED,
                          clip_image_in_channels=IMAGE, switch_level=(False,)),
    direction="comfy",
    comfy_sizes=dict(stable_cascade_stage="c", **SIZES),
    detection_fix=lambda cfg: dict(SIZES),
    converter=_to_diffusers,
    conditioning=conditioning,
    latent_shape=(1, 16, 8, 8),
    # SimpleTuner's generic preset wraps the attention of SDCascadeAttnBlock (stage C has no FeedForward)
    presets={"generic": ["Attention", "FeedForward"]},
    sigmas=sigmas,
    simpletuner_t=simpletuner_t,
)
