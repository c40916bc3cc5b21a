"""What the pack knows per model family, one small module each: the diffusers names trainers give
its layers where ComfyUI's own key map lacks them.

SimpleTuner trains on diffusers models, so its files name modules by diffusers paths
(``lycoris_blocks_0_attn1_to_q``). ComfyUI's key map knows those paths for some families; for the
others a family module gives ``diffusers_map(unet_config)``: diffusers weight key -> ComfyUI
weight key, or ``(key, (0, offset, size))`` for a slice of a fused layer (Flux.2's
``to_qkv_mlp_proj`` is the whole fused ``linear1``; Lumina 2's ``to_q`` a slice of ``qkv``).
From it ``names`` derives every name form trainers write (``lycoris_``, ``lora_transformer_``,
``transformer.``, the bare path).

``for_model(model)`` finds the family of a ComfyUI ``BaseModel`` by the class of its model config
(``comfy.supported_models``: it tells Z-Image from Lumina 2, which share one model class), the most
derived one a module lists; a new family is one new module in this package.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional


# SimpleTuner's model families (its checkpoints' metadata ``modelspec.architecture`` is
# "<family>-<flavour>/lora") as users know them; the ones ComfyUI runs no model of
SIMPLETUNER_FAMILIES = {
    "sd1x": "Stable Diffusion 1.x", "sdxl": "SDXL", "kolors": "Kolors", "sd3": "SD3", "flux2": "Flux.2",
    "flux": "Flux.1", "chroma": "Chroma", "qwen_image": "Qwen-Image", "hidream": "HiDream", "auraflow": "AuraFlow",
    "pixart_sigma": "PixArt Sigma", "pixart": "PixArt", "sanavideo": "Sana Video", "sana": "Sana",
    "z_image": "Z-Image", "lumina2": "Lumina 2", "longcat_image": "LongCat-Image", "kandinsky5": "Kandinsky 5",
    "stable_cascade": "Stable Cascade", "wan": "Wan", "ltxvideo2": "LTX-2", "ltxvideo": "LTX-Video",
    "hunyuanvideo": "HunyuanVideo", "cosmos2image": "Cosmos-Predict2", "cosmos": "Cosmos",
}
NOT_IN_COMFYUI = ("kolors", "sana", "sanavideo")


def trained_for(metadata: dict) -> Optional[tuple[str, str]]:
    """(SimpleTuner family, its name) a file says it was trained for, or None."""
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    for key in sorted(SIMPLETUNER_FAMILIES, key=len, reverse=True):
        if arch.startswith(key + "-") or arch.startswith(key + "/") or arch == key:
            return key, SIMPLETUNER_FAMILIES[key]
    return None


def trained_for_note(metadata: dict) -> str:
    """A sentence for the loader's errors: what the file says it was trained for, and whether
    ComfyUI runs such a model at all ('' when the file does not say)."""
    found = trained_for(metadata)
    if found is None:
        return ""
    key, name = found
    if key in NOT_IN_COMFYUI:
        return f" The file says it was trained for {name}, a model ComfyUI does not run: it cannot be applied."
    return f" The file says it was trained for {name}: load it on a {name} model."


@dataclass(frozen=True)
class Family:
    name: str  # as the loader's info shows it
    config_classes: tuple  # ComfyUI supported_models class names of this family
    # unet_config -> {diffusers weight key: ComfyUI key | (key, (0, offset, size))}, for the names
    # ComfyUI's key map does not know (None: it knows them all)
    diffusers_map: Optional[Callable[[dict], dict]] = field(default=None, compare=False)


def crossed(parents: dict, children: dict) -> dict:
    """{"a.b": "A.B"} for every parent rename a -> A and child rename b -> B."""
    return {f"{p}.{c}": f"{pp}.{cc}" for p, pp in parents.items() for c, cc in children.items()}


def renames(outer: dict, per_block: dict, blocks: int, diffusers_block: str, comfy_block: str) -> dict:
    """A ``diffusers_map`` of weight renames: ``outer`` {diffusers path: ComfyUI path} once, and
    ``per_block`` the same within each of ``blocks`` blocks, whose paths begin with
    ``diffusers_block`` / ``comfy_block`` (``{}`` for the block index)."""
    out = {f"{d}.weight": f"{c}.weight" for d, c in outer.items()}
    for i in range(blocks):
        d, c = diffusers_block.format(i), comfy_block.format(i)
        out.update({f"{d}.{dp}.weight": f"{c}.{cp}.weight" for dp, cp in per_block.items()})
    return out


@functools.lru_cache(maxsize=None)
def _registry() -> tuple:
    return tuple(importlib.import_module(f"{__name__}.{m.name}").FAMILY for m in pkgutil.iter_modules(__path__))


def for_model(model) -> Family:
    """The family of ``model`` (a ComfyUI ``BaseModel``): the module listing the most derived class
    of its model config; an unnamed one for configs no module lists."""
    families = _registry()
    config = getattr(model, "model_config", None)
    for cls in type(config).__mro__ if config is not None else ():
        for fam in families:
            if cls.__name__ in fam.config_classes:
                return fam
    name = type(config).__name__ if config is not None else type(model).__name__
    return Family(name, (name,))


def names(model) -> dict:
    """{file module name: key map value} for the names of ``model``'s family map."""
    fam = for_model(model)
    if fam.diffusers_map is None:
        return {}
    out = {}
    for dkey, target in fam.diffusers_map(model.model_config.unet_config).items():
        if not dkey.endswith(".weight"):
            continue
        path = dkey[: -len(".weight")]
        if isinstance(target, str):
            value = "diffusion_model." + target
        else:
            value = ("diffusion_model." + target[0],) + tuple(target[1:])
        flat = path.replace(".", "_")
        for name in (f"lycoris_{flat}", f"lora_transformer_{flat}", f"transformer.{path}", path):
            out[name] = value
    return out
