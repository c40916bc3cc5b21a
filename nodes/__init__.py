"""The pack's nodes (thin: inputs, calls into ``comfy_glue`` and ``tlora_core``, outputs)."""

from comfy_api.latest import ComfyExtension, io

from .loader import TLoraLoader
from .preview import TLoraSchedulePreview
from .save import TLoraSaveSelfContained
from .schedule import TLoraSchedule


class TLoraExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TLoraLoader, TLoraSchedule, TLoraSchedulePreview, TLoraSaveSelfContained]
