"""takenoko T-LoRA (seruva19/takenoko ``src/networks/t_lora.py``, a Wan trainer).

Keys: ``t_lora_unet_<module path>`` on Wan's own names (``blocks.N.self_attn.q``, ``cross_attn.*``,
``ffn.0/2``). Per module (the file may mix them): plain ``lora_down`` / ``lora_up`` / ``alpha``, or
orthogonal ``q_layer`` / ``p_layer`` / ``lambda_layer`` with the stored base ``base_q.weight``,
``base_p.weight``, ``base_lambda`` (its unused ``lora_down`` / ``lora_up`` saved beside them);
scale alpha / R.

Schedule: only in the training TOML the file embeds (metadata ``takenoko_config_content``):
``network_args`` = ["tlora_min_rank=1", "tlora_alpha=1.0", "tlora_boundary_timestep=875", ...]. A
boundary schedule: every rank on for t <= boundary, then down to min_rank at t = 1000, the
exponent over [boundary, 1000]; t = 1000 * sigma + 1 (its timestep sampling), not truncated.
takenoko's sampler means to mask at inference (the paper's behaviour), as the loader does.
"""

from __future__ import annotations

import re

from ..schedule import TIMESTEP
from .errors import TLoRAFormatError
from .kohya_modules import read_modules
from .settings import first_number
from .tlora_file import TLoRAFile, finish, note_skipped

NAME = "takenoko T-LoRA (Wan)"
PREFIX = "t_lora_unet_"
DEFAULTS = {"tlora_min_rank": 1, "tlora_alpha": 1.0, "tlora_boundary_timestep": 875}


def detect(tensors: dict, metadata: dict) -> bool:
    return metadata.get("takenoko_network_module") == "networks.t_lora" or any(k.startswith(PREFIX) for k in tensors)


def network_args(config_text: str) -> dict:
    """``network_args`` of takenoko's TOML config: a list of "key=value" strings (or one string of
    them, comma-separated), split at the first "="."""
    try:
        import tomllib

        args = tomllib.loads(config_text).get("network_args", [])
    except ImportError:  # Python 3.10: the list, read by pattern
        m = re.search(r"^\s*network_args\s*=\s*(\[[^\]]*\]|\"[^\"]*\")", config_text, re.M)
        args = re.findall(r"\"([^\"]*)\"", m.group(1)) if m else []
    if isinstance(args, str):
        args = args.split(",")
    out = {}
    for item in args:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def read(path: str, tensors: dict, metadata: dict, assume_tlora: bool = False) -> TLoRAFile:
    notes: list[str] = []
    config = metadata.get("takenoko_config_content")
    args, source = {}, "takenoko defaults"
    if config:
        try:
            args = network_args(config)
            source = "file metadata takenoko_config_content (network_args)"
        except ValueError as e:
            notes.append(f"the embedded takenoko config is not valid TOML ({e}): its defaults are used")
    else:
        notes.append("the file carries no takenoko config (saved with no_metadata?): its defaults min_rank 1, "
                     "alpha 1.0, boundary 875 are used")
    values = {k: args.get(k, v) for k, v in DEFAULTS.items()}
    found = [(source, {"min_rank": first_number(values, "tlora_min_rank", kind=int),
                       "alpha": first_number(values, "tlora_alpha"),
                       "boundary_timestep": first_number(values, "tlora_boundary_timestep")})]
    mods = read_modules(path, tensors, prefixes=(PREFIX,))
    note_skipped(notes, mods.text_encoder, mods.conv)
    if not mods.adapters:
        raise TLoRAFormatError(path, "no usable diffusion-model module")
    layout = "orthogonal, stored base" if mods.ortho == len(mods.adapters) else (
        "plain" if not mods.ortho else f"{mods.ortho} orthogonal and {len(mods.adapters) - mods.ortho} plain modules")
    return finish(path, f"{NAME}, {layout}", mods.adapters, found, notes, mods.lookup, metadata,
                  "takenoko's timesteps (t = 1000 * sigma + 1)", unsupported=mods.conv, per_module_rank=True,
                  mode=TIMESTEP, max_timestep=1000, timestep_offset=1.0, truncate_timestep=False)
