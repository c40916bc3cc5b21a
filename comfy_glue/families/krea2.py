"""Krea 2 (ComfyUI 0.28+: the single-stream ``SingleStreamDiT``): its trainer (Fizgig) names modules
natively (``lora_unet_blocks_0_attn_wq``), which ComfyUI's key map knows."""

from . import Family

FAMILY = Family("Krea 2", ("Krea2",))
