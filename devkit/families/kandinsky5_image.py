"""Kandinsky 5 image (ComfyUI 0.28 on): ``Kandinsky5Transformer3DModel`` without image condition
channels, as ComfyUI's ``Kandinsky5Image``. ComfyUI's detection tells it from the video model
only at its real width (2560, with rope scale 1 on every axis): the tiny one is built as that
class with that rope scale (``detection_fix``)."""

from __future__ import annotations

from . import Kit
from .kandinsky5_video import conditioning, diffusers_config

KIT = Kit(
    family="kandinsky5-image",
    comfy_class="Kandinsky5Image",
    diffusers_class="Kandinsky5Transformer3DModel",
    diffusers_config=diffusers_config(visual_cond=False),
    direction="diffusers",
    detection_fix=lambda detected: dict(rope_scale_factor=(1.0, 1.0, 1.0)),
    conditioning=conditioning,
    latent_shape=(1, 16, 8, 8),
    presets={"family": ["Kandinsky5Attention", "Kandinsky5FeedForward"]},
    min_host=(0, 28, 0),
)
