"""A file's module names -> the names to look up in the model's key map, best first.

Trainers name a module by a diffusers path (``transformer_blocks.0.attn.to_q``), by that path with
``_`` and a prefix (``lycoris_...``, ``lora_unet_...``), or by the model's own layout; PEFT-style
exports add ``transformer.`` / ``unet.`` / ``base_model.model.``. The key map (ComfyUI's, plus the
pack's per-family maps) knows the forms listed here.
"""

from __future__ import annotations

UNDERSCORED_PREFIXES = ("lycoris_", "lora_unet_", "lora_transformer_")
_STRIP_DOTTED = ("base_model.model.", "transformer.", "unet.", "diffusion_model.", "model.")


def underscored(name: str) -> list[str]:
    """Key-map names for a kohya/LyCORIS-style module name (``lycoris_a_b_c``)."""
    out = [name]
    for p in UNDERSCORED_PREFIXES:
        if name.startswith(p):
            rest = name[len(p):]
            if rest.startswith("diffusion_model_"):  # wrapped on ComfyUI's BaseModel itself
                rest = rest[len("diffusion_model_"):]
            out += [q + rest for q in UNDERSCORED_PREFIXES]
            break
    return list(dict.fromkeys(out))


def dotted(path: str) -> list[str]:
    """Key-map names for a diffusers module path (``transformer_blocks.0.attn.to_q``)."""
    for p in _STRIP_DOTTED:
        if path.startswith(p):
            path = path[len(p):]
            break
    us = path.replace(".", "_")
    proc = path.replace(".to_", ".processor.to_")
    if proc.endswith(".to_out.0"):
        proc = proc[:-2]
    out = [path, "transformer." + path, "unet." + proc, proc, "diffusion_model." + path,
           "base_model.model." + path] + [q + us for q in UNDERSCORED_PREFIXES]
    return list(dict.fromkeys(out))
