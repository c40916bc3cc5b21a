"""The Anima T-LoRA kohya fork (orangemagic123/sd-scripts ``networks/lora_tlora_anima.py``, and its
SD/SDXL sibling ``networks/lora_tlora.py``).

Keys: ``lora_unet_<module path>`` on the Anima DiT (Cosmos-Predict2's ``blocks.N.self_attn.q_proj``
... ``mlp.layer1/2``), ``lora_te_`` for the text encoder. Two layouts (``ss_tlora_init``):
``kaiming``: ``lora_down`` / ``lora_up`` / ``alpha``; ``orthogonal`` / ``layer_orthogonal``:
``q_layer`` / ``p_layer`` / ``lambda_layer`` with the frozen base stored as ``base_q.weight``,
``base_p.weight`` and ``base_lambda_buf`` (a random QR basis for ``orthogonal``, the layer's SVD for
``layer_orthogonal``: either way used as stored). Every tensor in the save precision, bf16 alpha
included; scale alpha / R.

Schedule, from ``ss_tlora_*`` metadata: ``r = int(((T - t) / T) ** a * (R - r_min)) + r_min`` with
the DiT's own t = sigma in [0, 1] (``ss_tlora_max_timestep`` "1.0"), not truncated; the SD sibling
uses the scheduler's integer timestep against T = 1000.

The fork's own inference runs every rank (the mask is gated on training since 2026-04-14), while
its in-training samples, the files saved before that change and the paper mask: the loader masks
(its ``mask`` input gives the fork's all-rank inference).

Its ``<name>_comfy.safetensors`` sibling is the same adapter flattened to a plain rank-2r LoRA
(``diffusion_model.<path>.lora_A / lora_B``): no mask there.
"""

from __future__ import annotations

from ..schedule import TIMESTEP
from .errors import LORA_LOADER_HINT, TLoRAFormatError
from .kohya import settings
from .kohya_modules import read_modules
from .tlora_file import TLoRAFile, finish, note_skipped

NAME = "T-LoRA kohya fork (orangemagic123/sd-scripts)"
MODULES = {"networks.lora_tlora_anima": "Anima", "networks.lora_tlora": "SD / SDXL"}
ALL_RANKS_AT_INFERENCE = ("the fork's own inference runs every rank (its mask is a training-time regularisation "
                          "there); masked here, as its in-training samples and the paper do: set the Loader's "
                          "mask to 'all ranks' for the fork's own inference")


def detect(tensors: dict, metadata: dict) -> bool:
    return metadata.get("ss_network_module") in MODULES or any(k.endswith(".base_lambda_buf") for k in tensors)


def read(path: str, tensors: dict, metadata: dict, assume_tlora: bool = False) -> TLoRAFile:
    module = metadata.get("ss_network_module", "networks.lora_tlora_anima")
    if not any(k.startswith("ss_tlora_") for k in metadata):
        if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors):
            raise TLoRAFormatError(path, "the Anima fork's _comfy export of a T-LoRA: a plain LoRA at full rank, "
                                         "its timestep mask flattened away. Load the T-LoRA file itself (the one "
                                         f"without _comfy) here, or {LORA_LOADER_HINT} for full rank")
        raise TLoRAFormatError(path, f"a {module} file without its ss_tlora_* schedule metadata")
    notes = [ALL_RANKS_AT_INFERENCE] if module == "networks.lora_tlora_anima" else []
    mods = read_modules(path, tensors)
    note_skipped(notes, mods.text_encoder, mods.conv)
    if not mods.adapters:
        raise TLoRAFormatError(path, "no usable diffusion-model module")
    found = [("file metadata ss_tlora_*", settings(metadata))]
    layout = "orthogonal, stored base" if mods.ortho else "plain"
    fmt = f"{NAME} for {MODULES.get(module, 'Anima')}, {layout}"
    if metadata.get("ss_tlora_init"):
        fmt += f" ({metadata['ss_tlora_init']})"
    if module == "networks.lora_tlora":  # SD/SDXL: the scheduler's integer timestep, T = 1000
        return finish(path, fmt, mods.adapters, found, notes, mods.lookup, metadata, "the fork's SD convention",
                      unsupported=mods.conv, per_module_rank=True, mode=TIMESTEP, truncate_timestep=True)
    return finish(path, fmt, mods.adapters, found, notes, mods.lookup, metadata,
                  "the fork's convention (t = sigma, not truncated)", unsupported=mods.conv, per_module_rank=True,
                  mode=TIMESTEP, truncate_timestep=False)
