"""PixArt Alpha / Sigma: diffusers ``PixArtTransformer2DModel`` names on ComfyUI's ``PixArtMS``.

ComfyUI's key map knows these names only as ``transformer.<path>`` / ``base_model.model.<path>``;
SimpleTuner's LyCORIS files write ``lycoris_<path>``. ComfyUI's own table
(``comfy.utils.pixart_to_diffusers``: self-attention q/k/v are slices of ``attn.qkv``, cross-attention
k/v of ``cross_attn.kv_linear``) gives every name form from here.
"""

from . import Family


def diffusers_map(unet_config: dict) -> dict:
    import comfy.utils

    return comfy.utils.pixart_to_diffusers(unet_config)


FAMILY = Family("PixArt", ("PixArtAlpha", "PixArtSigma"), diffusers_map)
