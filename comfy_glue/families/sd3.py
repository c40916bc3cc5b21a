"""Stable Diffusion 3 / 3.5 (MMDiT): ComfyUI's key map knows its diffusers names."""

from . import Family

FAMILY = Family("SD3", ("SD3",))
