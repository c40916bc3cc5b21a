"""The standalone Flux T-LoRA trainer of seed 002 (``scripts/tlora_flux.py``: ``TLoRALinear`` /
``OrthoTLoRALinear`` wrapped around the transformer's ``nn.Linear`` layers).

``tlora_weights.safetensors`` keys, per wrapped layer (diffusers module paths):
- vanilla: ``<path>.down.weight`` [r, in], ``<path>.up.weight`` [out, r];
- ortho: ``<path>.q_layer.weight``, ``.p_layer.weight``, ``.lambda_layer`` and the frozen
  ``.base_q``, ``.base_p``, ``.base_lambda`` (buffers; ``.weight``-suffixed names are accepted too).
delta = (lora_alpha / lora_rank) * (vanilla: up diag(m) down; ortho: P diag(lambda m) Q - P0 diag(lambda0 m) Q0).

Settings come from the training YAML (``lora_rank``, ``lora_alpha``, ``min_rank``,
``alpha_rank_scale``, ``enable_rank_masking``) found beside the weights or up to two folders up.
Its inference masks by *step index* (``sigma_mask_from_step_index``), so that is the default mode.
"""

from __future__ import annotations

import glob
import os
import re

from .. import adapter as ad
from ..schedule import STEP_INDEX
from .errors import LORA_LOADER_HINT, TLoRAFormatError
from .keys import pair
from .names import dotted
from .official import KEY as OFFICIAL_KEY
from .settings import first_number, read_settings_file, sidecar_label
from .tlora_file import TLoRAFile, finish

TERMS = ("down.weight", "up.weight", "q_layer.weight", "p_layer.weight", "lambda_layer", "base_q", "base_p",
         "base_lambda", "base_q.weight", "base_p.weight", "base.weight", "base.bias")
_KEY = re.compile(r"^(?P<mod>[A-Za-z_][\w]*(?:\.[\w]+)+?)\.(?P<term>" + "|".join(re.escape(t) for t in
                                                                              sorted(TERMS, key=len, reverse=True)) + r")$")
YAML_KEYS = ("lora_rank", "min_rank", "alpha_rank_scale", "enable_rank_masking", "lora_alpha")


def _split(key: str):
    m = _KEY.match(key)
    if not m or OFFICIAL_KEY.match(key):
        return None
    mod = m["mod"]
    if "." not in mod or "processor" in mod.split("."):
        return None
    return mod, m["term"]


def detect(tensors: dict, metadata: dict) -> bool:
    terms = {}
    for k in tensors:
        s = _split(k)
        if s:
            terms.setdefault(s[0], set()).add(s[1])
    return any({"down.weight", "up.weight"} <= t or {"q_layer.weight", "lambda_layer"} <= t for t in terms.values())


def find_config(path: str):
    """The trainer's YAML config: beside the weights or up to two folders up."""
    d = os.path.dirname(os.path.abspath(path))
    for _ in range(3):
        for c in sorted(glob.glob(os.path.join(d, "*.yaml")) + glob.glob(os.path.join(d, "*.yml"))):
            data = read_settings_file(c)
            if data and any(k in data for k in YAML_KEYS):
                return c, data
        d = os.path.dirname(d)
    return None


def read(path: str, tensors: dict, metadata: dict, assume_tlora: bool = False) -> TLoRAFile:
    notes: list[str] = []
    groups = {}
    for k, v in tensors.items():
        s = _split(k)
        if s:
            groups.setdefault(s[0], {})[s[1]] = v
    cfg = find_config(path)
    found = []
    if cfg is None:
        if not assume_tlora and not any("lambda_layer" in g for g in groups.values()):
            raise TLoRAFormatError(path, "down/up weights in diffusers module paths but no trainer config with a rank "
                                         "schedule (a YAML with lora_rank / min_rank beside the file or up to two "
                                         "folders up): put the training YAML beside it. A plain LoRA: "
                                         + LORA_LOADER_HINT)
        notes.append("no trainer YAML found: lora_alpha = rank (scale 1), schedule defaults min_rank 1, alpha 1.0")
        data, label = {}, None
    else:
        label, data = sidecar_label(path, cfg[0]), cfg[1]
        found.append((label, {"max_rank": first_number(data, "lora_rank", "rank", kind=int),
                              "min_rank": first_number(data, "min_rank", kind=int),
                              "alpha": first_number(data, "alpha_rank_scale")}))

    modules, lookup = {}, {}
    base_linear = [m for m, g in groups.items() if "base.weight" in g]
    for mod, g in sorted(groups.items()):
        if "down.weight" in g or "up.weight" in g:
            down, up = pair(path, mod, g)
            r = down.shape[0]
            kind = "vanilla"
        elif "q_layer.weight" in g:
            bq = g.get("base_q", g.get("base_q.weight"))
            bp = g.get("base_p", g.get("base_p.weight"))
            missing = [n for n, t in (("p_layer.weight", g.get("p_layer.weight")), ("lambda_layer", g.get("lambda_layer")),
                                      ("base_q", bq), ("base_p", bp), ("base_lambda", g.get("base_lambda"))) if t is None]
            if missing:
                raise TLoRAFormatError(path, f"ortho module {mod} lacks {', '.join(missing)}")
            r = g["q_layer.weight"].shape[0]
            kind = "ortho"
        else:
            continue
        lora_alpha = first_number(data, "lora_alpha")
        scale = (lora_alpha / first_number(data, "lora_rank", kind=int)) if (
            lora_alpha is not None and first_number(data, "lora_rank", kind=int)) else 1.0
        try:
            if kind == "vanilla":
                modules[mod] = ad.plain(mod, up, down, scale)
            else:
                modules[mod] = ad.ortho(mod, g["p_layer.weight"], g["lambda_layer"], g["q_layer.weight"], bp,
                                        g["base_lambda"], bq, scale)
        except ValueError as e:
            raise TLoRAFormatError(path, f"module {mod}: {e}") from None
        lookup[mod] = dotted(mod)
    if base_linear:
        notes.append(f"{len(base_linear)} frozen base layer copies in the file ignored (the model's own weights are used)")
    if not modules:
        raise TLoRAFormatError(path, "no usable T-LoRA module in this file")
    kinds = {m.group for m in modules.values()}
    variant = {1: "vanilla", 2: "ortho"}[next(iter(kinds))] if len(kinds) == 1 else "mixed"
    tfile = finish(path, f"seed-002 Flux trainer ({variant})", modules, found, notes, lookup, metadata,
                   "seed-002 trainer inference (step index)", mode=STEP_INDEX)
    if data.get("enable_rank_masking") is False:
        notes.append(f"{label} says enable_rank_masking: false: trained with every rank on, so it is applied at "
                     "full rank on every step")
        tfile.schedule = tfile.schedule.with_overrides(label, min_rank=tfile.rank)
    return tfile
