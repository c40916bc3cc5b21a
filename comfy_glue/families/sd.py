"""Stable Diffusion 1.x / 2.x and SDXL UNets: ComfyUI's key map knows their diffusers names."""

from . import Family

FAMILY = Family("Stable Diffusion UNet (SD 1.x / 2.x / SDXL)", ("SD15", "SD20", "SDXL", "SDXLRefiner"))
