"""kohya-style LoRA files trained with a T-LoRA schedule (sd-scripts networks that add one).

Keys per module: ``lora_unet_<path>.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r],
``.alpha`` (``kohya_modules``); delta = (alpha / r) up diag(m) down. What makes it a T-LoRA is the
schedule in the metadata: ``ss_tlora_min_rank``, ``ss_tlora_alpha_rank_scale``,
``ss_tlora_max_timestep`` (or the same settings in a sidecar); t is the integer timestep. Without
them it is a plain LoRA, for ComfyUI's LoraLoader. The trainers with formats of their own (the
Anima fork, takenoko, Fizgig) have their own readers.
"""

from __future__ import annotations

import json

import torch

from ..schedule import TIMESTEP
from .errors import LORA_LOADER_HINT, TLoRAFormatError
from .kohya_modules import read_modules
from .settings import find_sidecars, first_number, sidecar_label
from .tlora_file import TLoRAFile, finish, note_skipped

NAME = "kohya-style LoRA with T-LoRA schedule"


def detect(tensors: dict, metadata: dict) -> bool:
    return any(k.endswith(".lora_down.weight") for k in tensors)


def settings(d: dict) -> dict:
    """The schedule in sd-scripts' ``ss_tlora_*`` metadata (or the same names in a sidecar)."""
    return {"max_rank": first_number(d, "ss_network_dim", kind=int),
            "min_rank": first_number(d, "ss_tlora_min_rank", "tlora_min_rank", kind=int),
            "alpha": first_number(d, "ss_tlora_alpha_rank_scale", "tlora_alpha", "alpha_rank_scale"),
            "max_timestep": first_number(d, "ss_tlora_max_timestep", "tlora_max_timestep")}


def read(path: str, tensors: dict, metadata: dict, assume_tlora: bool = False) -> TLoRAFile:
    notes: list[str] = []
    found = []
    for sc_path, data in find_sidecars(path):
        s = settings(data)
        if s["min_rank"] is not None or s["alpha"] is not None:
            found.append((sidecar_label(path, sc_path), s))
    if any(k.startswith("ss_tlora_") for k in metadata):
        found.append(("file metadata ss_tlora_*", settings(metadata)))
    if not found:
        exported = _exported_tlora(tensors, metadata)
        if exported:
            raise TLoRAFormatError(path, f"{exported} a T-LoRA exported as a plain LoRA (LyCORIS' rank-2r export: "
                                         "trained and base terms side by side as lora_up / lora_down): its timestep "
                                         f"mask is lost, so it can only run at full rank: {LORA_LOADER_HINT}, or "
                                         "load the original tlora file here")
        what = "a LyCORIS lora/locon file" if any(k.startswith("lycoris_") for k in tensors) else "a plain LoRA"
        raise TLoRAFormatError(path, f"{what} (lora_down/lora_up) without a T-LoRA schedule (no ss_tlora_* "
                                     f"metadata, no sidecar with tlora settings): {LORA_LOADER_HINT}")
    mods = read_modules(path, tensors)
    note_skipped(notes, mods.text_encoder, mods.conv)
    if not mods.adapters:
        raise TLoRAFormatError(path, "no usable diffusion-model module")
    return finish(path, NAME, mods.adapters, found, notes, mods.lookup, metadata, "kohya convention (integer timestep)",
                  unsupported=mods.conv, per_module_rank=True, mode=TIMESTEP, truncate_timestep=True)


def _exported_tlora(tensors: dict, metadata: dict) -> str:
    """Whether this plain LoRA is a T-LoRA flattened into one: "this is" where its training config
    says so (``algo`` tlora), "this looks like" where its tensors do (an even rank whose second half
    of ``lora_down`` is orthonormal: the SVD base), else ""."""
    for key in ("lycoris_config", "ss_network_args"):
        try:
            cfg = json.loads(metadata.get(key) or "{}")
        except ValueError:
            continue
        if isinstance(cfg, dict) and str(cfg.get("algo", "")).lower() == "tlora":
            return "this is"
    down = next((t for k, t in sorted(tensors.items()) if k.endswith(".lora_down.weight") and t.ndim == 2), None)
    if down is None or down.shape[0] % 2 or down.shape[0] < 2:
        return ""
    base = down[down.shape[0] // 2:].double()
    gram = base @ base.t()
    # orthonormal up to the rounding of the file's dtype (convert_tlora.py saves the trainer's bf16)
    atol = 1e-3 if down.dtype in (torch.float32, torch.float64) else 2e-2
    return "this looks like" if bool(torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=atol)) else ""
