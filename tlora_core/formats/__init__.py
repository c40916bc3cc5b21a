"""Every trainer's T-LoRA file, detected automatically: ``read_tlora(path) -> TLoRAFile``.

Readers (one per trainer): ``lycoris`` (SimpleTuner / lycoris-lora ``tlora``), ``official``
(ControlGenAI SDXL processors and Flux ``lora.pt``), ``flux_trainer`` (the seed-002 standalone
Flux trainer), ``kohya`` (``lora_down``/``lora_up`` with ``ss_tlora_*`` metadata). All return the one
representation of ``tlora_core.adapter`` (or, for LyCORIS, ``SvdBaseTerms`` to be completed from the
model's base weights) and the training settings they found, with their sources.

Everything is checked before anything is patched: unreadable, truncated or unsafe files, NaN/Inf
tensors, rank/shape mismatches, plain LoRAs without a schedule (-> ComfyUI's LoraLoader).
"""

from __future__ import annotations

import os

from . import flux_trainer, kohya, lycoris, official
from .base import (LORA_LOADER_HINT, SvdBaseTerms, TLoRAFile, TLoRAFormatError, check_finite, load_state_dict,
                   lookup_dotted, lookup_underscored)

__all__ = ["read_tlora", "detect_format", "TLoRAFile", "TLoRAFormatError", "SvdBaseTerms", "load_state_dict",
           "write_self_contained"]

write_self_contained = lycoris.write_self_contained


def detect_format(tensors: dict, metadata: dict) -> str | None:
    """'lycoris' | 'official' | 'flux_trainer' | 'kohya' | None."""
    if lycoris.detect(tensors, metadata):
        return "lycoris"
    if official.detect(tensors, metadata):
        return "official"
    if kohya.detect(tensors, metadata):
        return "kohya"
    if flux_trainer.detect(tensors, metadata):
        return "flux_trainer"
    return None


def _not_tlora_reason(tensors: dict) -> str:
    keys = list(tensors)
    algo = lycoris.describe_other(tensors)
    if algo:
        return f"a LyCORIS {algo} file, not tlora (no lambda_layer keys): {LORA_LOADER_HINT}"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return f"a PEFT LoRA (lora_A/lora_B) without any T-LoRA schedule: {LORA_LOADER_HINT}"
    if any(".lora.down.weight" in k or ".lora_linear_layer." in k for k in keys):
        return f"a diffusers LoRA without any T-LoRA schedule: {LORA_LOADER_HINT}"
    sample = ", ".join(sorted(keys)[:4])
    return f"not a T-LoRA of any known trainer (keys like: {sample})"


def read_tlora(path, assume_tlora: bool = False) -> TLoRAFile:
    """Read any supported T-LoRA file. Raises ``TLoRAFormatError`` naming the file and the problem.

    ``assume_tlora``: accept layouts that are also used by plain LoRAs (official vanilla, seed-002
    vanilla) even when no settings file says they were trained with a schedule.
    """
    path = os.fspath(path)
    tensors, metadata = load_state_dict(path)
    if not tensors:
        raise TLoRAFormatError(path, "the file holds no tensors")
    check_finite(path, tensors)
    fmt = detect_format(tensors, metadata)
    if fmt is None:
        raise TLoRAFormatError(path, _not_tlora_reason(tensors))
    if fmt == "lycoris":
        tfile = lycoris.read(path, tensors, metadata)
    elif fmt == "official":
        tfile = official.read(path, tensors, metadata, assume_tlora)
    elif fmt == "kohya":
        tfile = kohya.read(path, tensors, metadata)
    else:
        tfile = flux_trainer.read(path, tensors, metadata, assume_tlora)
    return tfile
