"""The paper's official code (ControlGenAI/T-LoRA): SDXL attention processors and Flux ``lora.pt``.

Keys per adapted projection: ``<attention path>.processor.to_{q,k,v,out}_lora.<terms>``, and for
Flux also ``to_{q,k,v}_proj_lora`` (the context projections ``add_{q,k,v}_proj``).

- vanilla (``trainer_type: lora``): ``down.weight`` [r, in], ``up.weight`` [out, r];
  delta = up diag(m) down (no alpha scaling).
- ortho (``ortho_lora`` / ``lortho_lora``): ``q_layer.weight``, ``p_layer.weight``, ``lambda_layer``
  and the frozen ``base_q.weight``, ``base_p.weight``, ``base_lambda``;
  delta = P diag(lambda m) Q - P0 diag(lambda0 m) Q0.

Settings: ``<run>/logs/hparams.yml`` (SDXL: ``lora_rank``, ``min_rank``, ``alpha_rank_scale``,
``trainer_type``; Flux: ``rank``, ``min_rank``, ``tlora``). Both use the float timestep.
The Flux ``lora.pt`` is a pickle and is opened with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import re

from .. import adapter as ad
from ..schedule import TIMESTEP
from .errors import LORA_LOADER_HINT, TLoRAFormatError
from .keys import pair, sample_names
from .names import dotted
from .settings import find_sidecars, first_number, sidecar_label
from .tlora_file import TLoRAFile, finish

KEY = re.compile(
    r"^(?:unet\.|transformer\.)?(?P<mod>(?P<attn>.+?)\.processor\.(?P<proj>to_q|to_k|to_v|to_out|to_q_proj|to_k_proj"
    r"|to_v_proj)_lora)\.(?P<term>down\.weight|up\.weight|q_layer\.weight|p_layer\.weight|lambda_layer"
    r"|base_q\.weight|base_p\.weight|base_lambda|base_q|base_p)$")
PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
        "to_q_proj": "add_q_proj", "to_k_proj": "add_k_proj", "to_v_proj": "add_v_proj"}


def detect(tensors: dict, metadata: dict) -> bool:
    return any(KEY.match(k) for k in tensors)


def _is_flux(mods) -> bool:
    return any(m.startswith(("transformer_blocks.", "single_transformer_blocks.")) for m in mods)


def read(path: str, tensors: dict, metadata: dict, assume_tlora: bool = False) -> TLoRAFile:
    notes: list[str] = []
    groups, attn_of = {}, {}
    for k, v in tensors.items():
        m = KEY.match(k)
        if m:
            term = m["term"]
            term = {"base_q": "base_q.weight", "base_p": "base_p.weight"}.get(term, term)
            groups.setdefault(m["mod"], {})[term] = v
            attn_of[m["mod"]] = (m["attn"], m["proj"])
    flux = _is_flux(groups)
    family = "Flux" if flux else "SDXL"

    # settings
    found, hp = [], None
    for sc_path, data in find_sidecars(path, names=("hparams.yml", "hparams.yaml"), parents=2):
        if any(k in data for k in ("min_rank", "lora_rank", "rank", "trainer_type", "tlora")):
            hp = (sidecar_label(path, sc_path), data)
            break
    if hp is not None:
        label, data = hp
        if flux and data.get("tlora") is False:
            raise TLoRAFormatError(path, f"{label} says tlora: false: a plain LoRA of the official Flux code, "
                                         f"trained without a rank schedule; {LORA_LOADER_HINT}")
        found.append((label, {"max_rank": first_number(data, "lora_rank", "rank", kind=int),
                              "min_rank": first_number(data, "min_rank", kind=int),
                              "alpha": None if flux else first_number(data, "alpha_rank_scale")}))
        trainer = data.get("trainer_type")
    else:
        trainer = None

    modules, lookup, dead = {}, {}, []
    ortho_seen = vanilla_seen = False
    for mod, g in sorted(groups.items()):
        attn, proj = attn_of[mod]
        if flux and attn.startswith("single_transformer_blocks.") and proj not in ("to_q", "to_k", "to_v"):
            dead.append(mod)  # the official processor never calls these in single blocks
            continue
        if "down.weight" in g or "up.weight" in g:
            down, up = pair(path, mod, g)
            modules[mod] = ad.plain(mod, up, down, 1.0)
            vanilla_seen = True
        else:
            need = ("q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda")
            missing = [n for n in need if n not in g]
            if missing:
                raise TLoRAFormatError(path, f"ortho module {mod} lacks {', '.join(missing)}")
            try:
                modules[mod] = ad.ortho(mod, g["p_layer.weight"], g["lambda_layer"], g["q_layer.weight"],
                                        g["base_p.weight"], g["base_lambda"], g["base_q.weight"], 1.0)
            except ValueError as e:
                raise TLoRAFormatError(path, f"module {mod}: {e}") from None
            ortho_seen = True
        lookup[mod] = dotted(f"{attn}.{PROJ[proj]}")
    if dead:
        notes.append(f"{len(dead)} module(s) of single blocks dropped: the official Flux processor never uses "
                     f"them ({sample_names(dead, 2)})")
    if not modules:
        raise TLoRAFormatError(path, "no usable module in this official-layout file")
    variant = "ortho" if ortho_seen and not vanilla_seen else ("vanilla" if vanilla_seen and not ortho_seen else "mixed")
    if trainer and variant != "mixed":
        expected = ("lora",) if variant == "vanilla" else ("ortho_lora", "lortho_lora")
        if trainer not in expected:
            notes.append(f"hparams trainer_type is {trainer!r} but the tensors are {variant}")
    if hp is None:
        if variant == "vanilla" and not assume_tlora:
            raise TLoRAFormatError(path, "looks like a plain LoRA in the diffusers attention-processor layout: no "
                                         "T-LoRA schedule found (no hparams.yml beside it or in ../logs/). If it is "
                                         "an official T-LoRA, put its hparams.yml beside it; a plain LoRA: "
                                         + LORA_LOADER_HINT)
        notes.append("no hparams.yml found beside the file or in ../logs/: schedule defaults min_rank 1, "
                     "alpha 1.0 are used")
    convention = "official code (float timestep" + (", linear schedule)" if flux else ")")
    extra = {"alpha": 1.0} if flux else {}
    return finish(path, f"official T-LoRA ({family}, {variant})", modules, found, notes, lookup, metadata, convention,
                  mode=TIMESTEP, truncate_timestep=False, **extra)
