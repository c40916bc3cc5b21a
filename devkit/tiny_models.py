"""The tiny Flux and SDXL models most tests use: kit-built (``devkit.families``), so each has a
diffusers twin with the same weights (``families.pair_of``) and is what ComfyUI's own detection
makes of such a file on whatever host runs the tests. Deterministic per seed.
"""

from __future__ import annotations

import dataclasses

import torch

from .families import build, flux, pair_of, sdxl  # noqa: F401  (pair_of: for the tests)
from .families import seeded_init_  # noqa: F401  (re-exported for the demo)

FLUX_CONTEXT_DIM, FLUX_POOLED_DIM = flux.CONTEXT_DIM, flux.POOLED_DIM


def tiny_flux(seed: int = 0, depth: int = 1, depth_single_blocks: int = 1, hidden_size: int = 256, num_heads: int = 2):
    """A Flux.1 DiT (ComfyUI ``model_base.Flux``) in a ModelPatcher; head width hidden_size / num_heads
    must be 128 (what ComfyUI's detection assumes of Flux)."""
    if hidden_size != 128 * num_heads:
        raise ValueError(f"tiny_flux: hidden_size {hidden_size} must be 128 x num_heads ({num_heads})")
    kit = dataclasses.replace(flux.KIT, diffusers_config={**flux.KIT.diffusers_config, "num_layers": depth,
                                                          "num_single_layers": depth_single_blocks,
                                                          "num_attention_heads": num_heads})
    return build(kit, seed).model


def tiny_sdxl(seed: int = 0):
    """An SDXL-like UNet (ComfyUI ``model_base.SDXL``, discrete eps sampling), in a ModelPatcher."""
    return build(sdxl.KIT, seed).model


def flux_conditioning(batch: int = 1, tokens: int = 8, seed: int = 1):
    """Positive/negative conditioning in ComfyUI's list format for the tiny Flux model."""
    return flux.conditioning(flux.KIT, torch.Generator().manual_seed(seed), batch, tokens)


def sdxl_conditioning(batch: int = 1, tokens: int = 8, seed: int = 1):
    """Positive/negative conditioning for the tiny SDXL model (context + ``y`` vector + sizes)."""
    return sdxl.conditioning(sdxl.KIT, torch.Generator().manual_seed(seed), batch, tokens)
