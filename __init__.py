"""T-LoRA for ComfyUI: timestep-dependent rank masking for T-LoRA adapters.

ComfyUI entry point only: the nodes live in ``nodes/``, the host-free maths in ``tlora_core/``.
"""

from .nodes import TLoraExtension

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> TLoraExtension:
    return TLoraExtension()
