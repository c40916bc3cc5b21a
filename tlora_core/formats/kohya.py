"""kohya-style LoRA files trained with a T-LoRA schedule.

Keys per module: ``lora_unet_<path>.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r],
``.alpha``; delta = (alpha / r) up diag(m) down. What makes it a T-LoRA is the schedule in the
metadata: ``ss_tlora_min_rank``, ``ss_tlora_alpha_rank_scale``, ``ss_tlora_max_timestep`` (or the
same settings in a sidecar). Without them it is a plain LoRA, for ComfyUI's LoraLoader.
"""

from __future__ import annotations

from .. import adapter as ad
from ..schedule import TIMESTEP
from .errors import LORA_LOADER_HINT, TLoRAFormatError
from .keys import group_keys
from .names import underscored
from .settings import find_sidecars, first_number, sidecar_label
from .tlora_file import TLoRAFile, finish, note_skipped

NAME = "kohya-style LoRA with T-LoRA schedule"

SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def detect(tensors: dict, metadata: dict) -> bool:
    return any(k.endswith(".lora_down.weight") for k in tensors)


def _settings(d: dict) -> dict:
    return {"max_rank": first_number(d, "ss_network_dim", kind=int),
            "min_rank": first_number(d, "ss_tlora_min_rank", "tlora_min_rank", kind=int),
            "alpha": first_number(d, "ss_tlora_alpha_rank_scale", "tlora_alpha", "alpha_rank_scale"),
            "max_timestep": first_number(d, "ss_tlora_max_timestep", "tlora_max_timestep", kind=int)}


def read(path: str, tensors: dict, metadata: dict, assume_tlora: bool = False) -> TLoRAFile:
    notes: list[str] = []
    found = []
    for sc_path, data in find_sidecars(path):
        s = _settings(data)
        if s["min_rank"] is not None or s["alpha"] is not None:
            found.append((sidecar_label(path, sc_path), s))
    meta = _settings(metadata)
    if any(k.startswith("ss_tlora_") for k in metadata):
        found.append(("file metadata ss_tlora_*", meta))
    if not found:
        what = "a LyCORIS lora/locon file" if any(k.startswith("lycoris_") for k in tensors) else "a plain LoRA"
        raise TLoRAFormatError(path, f"{what} (lora_down/lora_up) without a T-LoRA schedule (no ss_tlora_* "
                                     f"metadata, no sidecar with tlora settings): {LORA_LOADER_HINT}")
    groups = group_keys(tensors, SUFFIXES)
    modules, lookup, te, conv = {}, {}, [], []
    for name, g in sorted(groups.items()):
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise TLoRAFormatError(path, f"module {name} lacks lora_{'up' if 'lora_down.weight' in g else 'down'}.weight")
        if name.startswith(TE_PREFIXES):
            te.append(name)
            continue
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        if down.ndim != 2 or up.ndim != 2:
            conv.append(name)
            continue
        r = down.shape[0]
        if up.shape[1] != r:
            raise TLoRAFormatError(path, f"module {name}: rank mismatch: lora_down {tuple(down.shape)}, "
                                         f"lora_up {tuple(up.shape)}")
        if "dora_scale" in g:
            raise TLoRAFormatError(path, f"module {name} is DoRA (dora_scale): not supported by the T-LoRA loader")
        alpha = float(g["alpha"]) if "alpha" in g else float(r)
        modules[name] = ad.plain(name, up, down, alpha / r)
        lookup[name] = underscored(name)
    note_skipped(notes, te, conv)
    if not modules:
        raise TLoRAFormatError(path, "no usable diffusion-model module")
    return finish(path, NAME, modules, found, notes, lookup, metadata, "kohya convention (integer timestep)",
                  mode=TIMESTEP, truncate_timestep=True)
