"""Z-Image: ComfyUI's key map knows its diffusers names (to_q / to_k / to_v as slices of qkv)."""

from . import Family

FAMILY = Family("Z-Image", ("ZImage",))
