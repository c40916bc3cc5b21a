"""Fizgig T-LoRA (its Krea 2 trainer: metadata ``ss_adapter`` = "tlora").

Keys: ``lora_unet_<module path>`` on every Linear of the Krea 2 DiT (its own names:
``blocks.N.attn.wq`` ...), ``lora_down`` / ``lora_up`` / ``alpha`` in the training dtype; scale
alpha / R. Schedule: the official linear rule on the integer timestep, ``ts = int(1000 * t)`` with
t the flow sigma: ``ss_tlora_min_rank``, ``ss_tlora_max_timestep`` ("1000"), exponent 1 (it
stores none). Its own sampler masks at inference, as the loader does.
"""

from __future__ import annotations

from ..schedule import TIMESTEP
from .errors import TLoRAFormatError
from .kohya import settings
from .kohya_modules import read_modules
from .tlora_file import TLoRAFile, finish, note_skipped

NAME = "Fizgig T-LoRA"


def detect(tensors: dict, metadata: dict) -> bool:
    return str(metadata.get("ss_adapter", "")).lower() == "tlora"


def read(path: str, tensors: dict, metadata: dict, assume_tlora: bool = False) -> TLoRAFile:
    notes: list[str] = []
    mods = read_modules(path, tensors)
    note_skipped(notes, mods.text_encoder, mods.conv)
    if not mods.adapters:
        raise TLoRAFormatError(path, "no usable diffusion-model module")
    values = settings(metadata)
    if values["min_rank"] is not None and values["min_rank"] < 1:  # its TLoRAModule: max(1, min(min_rank, R))
        notes.append(f"ss_tlora_min_rank {values['min_rank']}: Fizgig trains with min_rank 1 then, as used here")
        values["min_rank"] = 1
    found = [("file metadata ss_tlora_*", values)]
    arch = metadata.get("ss_architecture")
    fmt = NAME + (f" ({arch})" if arch else "")
    fixed = {} if "ss_tlora_alpha_rank_scale" in metadata else {"alpha": 1.0}
    return finish(path, fmt, mods.adapters, found, notes, mods.lookup, metadata,
                  "Fizgig's rule (linear, integer timestep)", unsupported=mods.conv, per_module_rank=True,
                  mode=TIMESTEP, truncate_timestep=True, **fixed)
