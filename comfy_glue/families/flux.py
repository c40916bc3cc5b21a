"""Flux.1: ComfyUI's key map knows its diffusers names (fused qkv / linear1 as slices)."""

from . import Family

FAMILY = Family("Flux.1", ("Flux",))
