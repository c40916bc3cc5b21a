"""Cosmos-Predict2 text-to-image: ``CosmosTransformer3DModel`` and ComfyUI's ``MiniTrainDIT``
(model config ``CosmosT2IPredict2``).

ComfyUI loads no diffusers Cosmos file, so the ComfyUI model comes from the host's class and
diffusers' converter makes the diffusers model of it. ComfyUI's detection takes the width from
the file but hard-codes the depth and heads (real widths only), the text width (1024) and the
AdaLN-LoRA width (256); the tiny model sets them with ``detection_fix``.

ComfyUI samples Cosmos by its EDM sigma (``ModelSamplingCosmosRFlow``, sigma up to 80), and
SimpleTuner's mask timestep is that sigma itself, ``int(sigma_EDM)`` against T = 1000
(simpletuner/helpers/models/cosmos/model.py: the batch's "timesteps" are the sampled EDM sigmas;
the trainer masks with int(t) and the scheduler's num_train_timesteps). Every sigma ComfyUI
samples therefore gives one of two masks (rank 8 / min rank 2 / alpha 1.5: 7 ranks from sigma 1
up, 8 below), so the six noise levels cover those two.
"""

from __future__ import annotations

import torch

from . import Kit

WIDTH, HEADS, BLOCKS, TEXT_DIM, ADALN_LORA = 256, 2, 2, 64, 32
FIX = dict(num_blocks=BLOCKS, num_heads=HEADS, crossattn_emb_channels=TEXT_DIM, adaln_lora_dim=ADALN_LORA)


def _conditioning(kit, gen):
    make = lambda: [[torch.randn(1, 7, TEXT_DIM, generator=gen), {}]]
    return make(), make()


KIT = Kit(
    family="cosmos2image",
    comfy_class="CosmosT2IPredict2",
    diffusers_class="CosmosTransformer3DModel",
    diffusers_config=dict(in_channels=16, out_channels=16, num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS,
                          num_layers=BLOCKS, mlp_ratio=4.0, text_embed_dim=TEXT_DIM, adaln_lora_dim=ADALN_LORA,
                          max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
                          concat_padding_mask=True, extra_pos_embed_type=None),
    direction="comfy",
    comfy_sizes=dict(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16, patch_spatial=2,
                     patch_temporal=1, model_channels=WIDTH, concat_padding_mask=True, pos_emb_cls="rope3d",
                     pos_emb_learnable=True, use_adaln_lora=True, extra_per_block_abs_pos_emb=False,
                     rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_enable_fps_modulation=False,
                     **FIX),
    detection_fix=lambda detected: dict(FIX),
    converter="convert_cosmos_transformer_checkpoint_to_diffusers",
    conditioning=_conditioning,
    latent_shape=(1, 16, 1, 8, 8),
    sigmas=lambda model: [80.0, 20.0, 5.0, 1.5, 0.4, 0.05],
    simpletuner_t=lambda model_sampling, sigma: float(sigma),
    min_masks=2,
)
