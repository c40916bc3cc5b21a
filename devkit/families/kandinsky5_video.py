"""Kandinsky 5 video (ComfyUI 0.28 on): ``Kandinsky5Transformer3DModel`` with the image condition
channels (``visual_cond``); ComfyUI's layout is diffusers' own, so ComfyUI loads the diffusers
state dict as it is. The text widths are the real ones (Qwen2.5-VL 3584, CLIP 768), which
ComfyUI's model takes as defaults rather than from the file."""

from __future__ import annotations

import torch

from . import Kit

TEXT_DIM, POOLED_DIM = 3584, 768


def conditioning(kit, gen):
    make = lambda: [[torch.randn(1, 7, TEXT_DIM, generator=gen), {"pooled_output": torch.randn(1, POOLED_DIM, generator=gen)}]]
    return make(), make()


def diffusers_config(visual_cond: bool) -> dict:
    return dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=TEXT_DIM, in_text_dim2=POOLED_DIM, time_dim=64,
                patch_size=(1, 2, 2), model_dim=128, ff_dim=256, num_text_blocks=1, num_visual_blocks=2,
                axes_dims=(16, 24, 24), visual_cond=visual_cond)


KIT = Kit(
    family="kandinsky5-video",
    comfy_class="Kandinsky5",
    diffusers_class="Kandinsky5Transformer3DModel",
    diffusers_config=diffusers_config(visual_cond=True),
    direction="diffusers",
    conditioning=conditioning,
    latent_shape=(1, 16, 3, 8, 8),
    presets={"family": ["Kandinsky5Attention", "Kandinsky5FeedForward"]},
    min_host=(0, 28, 0),
    video=True,
)
