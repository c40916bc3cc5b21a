"""Chroma (a Flux.1 derivative): ComfyUI's Flux key map covers its diffusers names."""

from . import Family

FAMILY = Family("Chroma", ("Chroma",))
