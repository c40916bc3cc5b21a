"""LongCat-Image (ComfyUI 0.28+): a Flux model, whose key map (``flux_to_diffusers``) covers
LongCat's diffusers names, which are Flux.1's (fused qkv / linear1 as slices)."""

from . import Family

FAMILY = Family("LongCat-Image", ("LongCatImage",))
