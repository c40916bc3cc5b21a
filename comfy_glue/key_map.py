"""Where a file's module names land on a ComfyUI model: ComfyUI's own LoRA key map, plus the pack's
per-family name maps (``families``) for the names ComfyUI's map does not know.

A target is a ComfyUI weight key, optionally a slice ``(dim, offset, size)`` of a fused layer (Flux
``qkv`` / ``linear1``), or a function that maps the file's layout of the weight to the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import comfy.lora

from . import families


@dataclass(frozen=True)
class Target:
    key: str  # ComfyUI state-dict key of the weight
    piece: Optional[tuple] = None  # (dim, offset, size) of a fused layer
    fn: Optional[Callable] = None  # maps the file's (e.g. diffusers) layout of the weight to the model's


def parse_target(value) -> Target:
    """A key map value (``key``, ``(key, piece)`` or ``(key, piece, fn)``) as a ``Target``."""
    if isinstance(value, str):
        return Target(value)
    if len(value) == 2:
        return Target(value[0], value[1])
    return Target(value[0], value[1], value[2])


def model_key_map(model) -> dict:
    """file module name -> key map value, for ``model`` (a ComfyUI ``BaseModel``). ComfyUI's own map
    wins where both know a name; the family map's names of layers this model lacks are left out."""
    keys = set(model.state_dict().keys())
    key_map = {n: v for n, v in families.names(model).items() if (v if isinstance(v, str) else v[0]) in keys}
    key_map.update(comfy.lora.model_lora_keys_unet(model, {}))  # a fresh dict every time: it fills it
    return key_map
