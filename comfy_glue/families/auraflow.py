"""AuraFlow: diffusers ``AuraFlowTransformer2DModel`` names on ComfyUI's AuraFlow MMDiT.

ComfyUI's key map knows these names only as ``transformer.<path>``; SimpleTuner's LyCORIS files
write ``lycoris_<path>``. ComfyUI's own table (``comfy.utils.auraflow_to_diffusers``, which its
loader also converts diffusers files with) gives every name form from here.
"""

from . import Family


def diffusers_map(unet_config: dict) -> dict:
    import comfy.utils

    return comfy.utils.auraflow_to_diffusers(unet_config)


FAMILY = Family("AuraFlow", ("AuraFlow",), diffusers_map)
