"""ComfyUI glue: the nodes (thin) and the model patcher (the only code that knows sampler internals)."""

from comfy_api.latest import ComfyExtension, io

from .loader import TLoraLoader
from .save import TLoraSaveSelfContained
from .schedule import TLoraSchedule, TLoraSchedulePreview


class TLoraExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TLoraLoader, TLoraSchedule, TLoraSchedulePreview, TLoraSaveSelfContained]
