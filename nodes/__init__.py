"""ComfyUI glue: the nodes (thin) and the model patcher (the only code that knows sampler internals)."""

from comfy_api.latest import ComfyExtension, io


class TLoraExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
