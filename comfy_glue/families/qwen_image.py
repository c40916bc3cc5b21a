"""Qwen-Image: ComfyUI's layout is diffusers', and its key map has the lycoris_ names."""

from . import Family

FAMILY = Family("Qwen-Image", ("QwenImage",))
