"""Every trainer's T-LoRA file, detected automatically: ``read_tlora(path) -> TLoRAFile``.

One reader per trainer, tried in the order of ``READERS``: each has ``detect(tensors, metadata)``
and ``read(path, tensors, metadata, assume_tlora)``, and returns the one representation of
``tlora_core.adapter`` (or, for LyCORIS, modules completed later from the model's base weights)
with the training settings it found and where it found them.

Everything is checked before anything is patched: unreadable, truncated or unsafe files, NaN/Inf
tensors, rank/shape mismatches, plain LoRAs without a schedule (-> ComfyUI's LoraLoader).
"""

from __future__ import annotations

import os

from . import anima, fizgig, flux_trainer, kohya, lycoris, official, takenoko
from .errors import LORA_LOADER_HINT, TLoRAFormatError
from .loading import check_finite, load_state_dict
from .lycoris import SvdBaseTerms, write_self_contained
from .tlora_file import TLoRAFile

__all__ = ["read_tlora", "detect_format", "TLoRAFile", "TLoRAFormatError", "SvdBaseTerms", "load_state_dict",
           "write_self_contained", "READERS"]

# the first reader whose detect() accepts a file reads it: the trainers that mark their files (by
# metadata or a prefix of their own) come first, then the layouts
READERS = {"takenoko": takenoko, "anima": anima, "fizgig": fizgig, "lycoris": lycoris, "official": official,
           "kohya": kohya, "flux_trainer": flux_trainer}


def detect_format(tensors: dict, metadata: dict) -> str | None:
    """The key of the reader for these tensors in ``READERS``, or None."""
    return next((name for name, reader in READERS.items() if reader.detect(tensors, metadata)), None)


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
    return READERS[fmt].read(path, tensors, metadata, assume_tlora)
