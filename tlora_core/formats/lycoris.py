"""LyCORIS ``tlora`` (lycoris-lora >= 4, as SimpleTuner trains it).

Keys per module: ``<name>.q_layer.weight`` [r, in], ``.p_layer.weight`` [out, r],
``.lambda_layer`` [1, r], ``.alpha``; ``<name>`` is ``lycoris_<diffusers path with _>`` (SimpleTuner),
``lora_unet_<...>`` (lycoris' kohya wrapper) or a ComfyUI-native path. The frozen base terms
(``base_q``, ``base_p``, ``base_lambda``) are not saved: they are the top-r singular triplets of the
base weight, so the modules are ``SvdBaseTerms`` until the glue completes them. A copy written by
``write_self_contained`` carries them and needs no SVD.

Settings: SimpleTuner stores its LyCORIS config as safetensors metadata ``lycoris_config`` (JSON:
``linear_dim``, ``linear_alpha``, ``tlora_min_rank``, ``tlora_alpha``) and often writes
``lycoris_config.json`` beside the weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .. import adapter as ad
from .. import svd
from ..schedule import TIMESTEP
from .errors import TLoRAFormatError
from .keys import group_keys, sample_names
from .names import UNDERSCORED_PREFIXES, underscored
from .settings import find_sidecars, first_number, sidecar_label
from .tlora_file import TLoRAFile, finish, note_skipped

NAME = "LyCORIS tlora (SimpleTuner / lycoris-lora)"
SUFFIXES = ("q_layer.weight", "p_layer.weight", "lambda_layer", "alpha", "base_q", "base_p", "base_lambda")
BASE_TERMS_META = "tlora_base_terms"  # metadata key of a self-contained copy
OTHER_ALGO_KEYS = {"hada_w1_a": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr", "oft_blocks": "diag-oft",
                   "oft_R": "boft", "lora_down.weight": "lora/locon", "a1.weight": "glora", "weight": "full/ia3",
                   "diff": "full"}
CONFIG_KEYS = ("algo", "linear_dim", "linear_alpha", "tlora_min_rank", "tlora_alpha")
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_te_")


@dataclass
class SvdBaseTerms:
    """A LyCORIS ``tlora`` module whose base terms must be rebuilt from the model's base weight.

    delta = (alpha / r) (P diag(lambda m) Q - P0 diag(lambda0 m) Q0), with (P0, lambda0, Q0) the
    top-r singular triplets of the base weight (lycoris-lora's ``sig_type`` choice).
    """

    name: str
    p: torch.Tensor  # (out, r)
    lam: torch.Tensor  # (r,)
    q: torch.Tensor  # (r, in)
    alpha: float
    sig_type: str = "principal"

    @property
    def rank(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.p.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def base_terms(self, base_weight: torch.Tensor, device=None) -> svd.BaseTerms:
        if tuple(base_weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: base weight {tuple(base_weight.shape)} does not match the adapter "
                             f"({self.out_features} out x {self.in_features} in)")
        return svd.base_terms(base_weight, self.rank, self.sig_type, device=device)

    def complete_with(self, terms: svd.BaseTerms) -> ad.LowRankAdapter:
        return ad.ortho(self.name, self.p, self.lam, self.q, terms.p, terms.lam, terms.q, scale=self.alpha / self.rank)


def detect(tensors: dict, metadata: dict) -> bool:
    return any(k.endswith(".lambda_layer") and "." not in k[: -len(".lambda_layer")] for k in tensors)


def describe_other(tensors: dict) -> str | None:
    """The LyCORIS algorithm of a file without ``tlora`` modules, if it looks like one."""
    names = {k.split(".", 1)[0] for k in tensors}
    if not any(n.startswith(UNDERSCORED_PREFIXES) for n in names):
        return None
    for suffix, algo in OTHER_ALGO_KEYS.items():
        if any(k.endswith("." + suffix) for k in tensors):
            return algo
    return None


def _config_settings(cfg: dict) -> dict:
    return {
        "max_rank": first_number(cfg, "linear_dim", kind=int),
        "min_rank": first_number(cfg, "tlora_min_rank", kind=int),
        "alpha": first_number(cfg, "tlora_alpha"),
        "max_timestep": first_number(cfg, "tlora_max_timestep", "max_timestep"),
    }


def read(path: str, tensors: dict, metadata: dict, assume_tlora: bool = False) -> TLoRAFile:
    notes: list[str] = []
    groups = group_keys(tensors, SUFFIXES)
    groups = {n: g for n, g in groups.items() if "lambda_layer" in g}

    # --- training settings: sidecars first, the file's own metadata wins where both say something
    found, configs = [], []
    for sc_path, data in find_sidecars(path, names=("lycoris_config.json",), parents=1):
        cfg = data.get("lycoris_config", data) if isinstance(data.get("lycoris_config"), dict) else data
        if any(k in cfg for k in CONFIG_KEYS):  # not some unrelated JSON/YAML with the same stem
            configs.append((sidecar_label(path, sc_path), cfg))
    raw = metadata.get("lycoris_config")
    if raw:
        try:
            cfg = json.loads(raw) if isinstance(raw, str) else raw
            if isinstance(cfg, str):  # stored JSON-encoded twice
                cfg = json.loads(cfg)
            configs.append(("file metadata lycoris_config", cfg))
        except (ValueError, TypeError):
            notes.append("file metadata lycoris_config is not valid JSON: ignored")
    sig_type = "principal"
    for label, cfg in configs:
        if not isinstance(cfg, dict):
            continue
        algo = str(cfg.get("algo", "tlora")).lower()
        if algo != "tlora":
            notes.append(f"{label} says algo {algo!r}, but the tensors are tlora modules")
        if cfg.get("use_data_init") in (False, "false", "False", 0):
            raise TLoRAFormatError(path, f"{label} says use_data_init=false: the base terms came from a random "
                                         "matrix at training time and cannot be rebuilt from the model")
        sig_type = str(cfg.get("sig_type", sig_type) or sig_type)
        found.append((label, _config_settings(cfg)))
    if not configs:
        notes.append("no training settings found (no lycoris_config metadata or sidecar): schedule defaults "
                     "min_rank 1, alpha 1.0 are used")
    elif not any(v.get("min_rank") is not None or v.get("alpha") is not None for _, v in found):
        notes.append("the LyCORIS config lacks tlora_min_rank / tlora_alpha (SimpleTuner's final save may drop "
                     "them): defaults min_rank 1, alpha 1.0 are used")
    if sig_type not in ("principal", "last", "middle"):
        raise TLoRAFormatError(path, f"unknown sig_type {sig_type!r} in the LyCORIS config")

    # --- modules
    modules, lookup, skipped_conv, skipped_te = {}, {}, [], []
    embedded = 0
    for name, g in sorted(groups.items()):
        missing = [s for s in ("q_layer.weight", "p_layer.weight", "lambda_layer") if s not in g]
        if missing:
            raise TLoRAFormatError(path, f"module {name} lacks {', '.join(missing)}")
        if name.startswith(TEXT_ENCODER_PREFIXES):
            skipped_te.append(name)
            continue
        q, p, lam = g["q_layer.weight"], g["p_layer.weight"], g["lambda_layer"].reshape(-1)
        if q.ndim != 2 or p.ndim != 2:
            skipped_conv.append(name)
            continue
        r = q.shape[0]
        if p.shape[1] != r or lam.numel() != r:
            raise TLoRAFormatError(path, f"module {name}: rank mismatch: q_layer {tuple(q.shape)}, "
                                         f"p_layer {tuple(p.shape)}, lambda_layer {tuple(g['lambda_layer'].shape)}")
        alpha = float(g["alpha"]) if "alpha" in g else float(r)
        if alpha == 0:  # lycoris: alpha None or 0 means alpha = rank
            alpha = float(r)
        if all(b in g for b in ("base_q", "base_p", "base_lambda")):
            bq, bp, bl = g["base_q"], g["base_p"], g["base_lambda"].reshape(-1)
            if tuple(bq.shape) != tuple(q.shape) or tuple(bp.shape) != tuple(p.shape) or bl.numel() != r:
                raise TLoRAFormatError(path, f"module {name}: stored base terms do not match the trained terms' shapes")
            modules[name] = ad.ortho(name, p, lam, q, bp, bl, bq, scale=alpha / r)
            embedded += 1
        else:
            modules[name] = SvdBaseTerms(name, p.float(), lam.float(), q.float(), alpha, sig_type)
        lookup[name] = underscored(name)
    note_skipped(notes, skipped_te, skipped_conv)
    if not modules:
        raise TLoRAFormatError(path, "LyCORIS tlora file without any usable (linear, diffusion-model) module")
    if embedded and embedded != len(modules):
        notes.append(f"{embedded} of {len(modules)} modules carry their base terms; the others are rebuilt by SVD")

    fmt = NAME + (" with stored base terms" if embedded == len(modules) else "")
    return finish(path, fmt, modules, found, notes, lookup, metadata, "LyCORIS convention (integer timestep)",
                  unsupported=skipped_conv, mode=TIMESTEP, truncate_timestep=True)


def write_self_contained(src_path: str, dst_path: str, base_terms: dict, base_info: str = "",
                         allow_partial: bool = False) -> str:
    """Copy a LyCORIS tlora file adding each module's base terms (``base_q``, ``base_p``, ``base_lambda``).

    ``base_terms``: module name -> ``svd.BaseTerms`` (or any object with ``p``, ``lam``, ``q``) computed
    from the base weights the file was trained on. Later loads of the copy need no SVD and no
    access to those exact weights (useful when the model in use is fp8/GGUF). Keys and metadata of
    the source are kept; ``tlora_base_terms`` metadata records where the terms came from.
    """
    from safetensors.torch import save_file

    from .loading import load_state_dict

    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path)
    tensors, metadata = load_state_dict(src_path)
    names = {k.split(".", 1)[0] for k in tensors if k.endswith(".lambda_layer")}
    missing = sorted(names - set(base_terms))
    if missing and not allow_partial:
        raise TLoRAFormatError(src_path, f"no base terms given for {len(missing)} module(s): {sample_names(missing)}")
    out = dict(tensors)
    for name in sorted(names & set(base_terms)):
        t = base_terms[name]
        q = tensors[f"{name}.q_layer.weight"]
        if tuple(t.q.shape) != tuple(q.shape) or tuple(t.p.shape) != tuple(tensors[f"{name}.p_layer.weight"].shape):
            raise TLoRAFormatError(src_path, f"module {name}: base terms {tuple(t.p.shape)}/{tuple(t.q.shape)} do not "
                                             f"match the file's {tuple(tensors[f'{name}.p_layer.weight'].shape)}/{tuple(q.shape)}")
        out[f"{name}.base_q"] = t.q.float().contiguous().cpu()
        out[f"{name}.base_p"] = t.p.float().contiguous().cpu()
        out[f"{name}.base_lambda"] = t.lam.float().reshape(1, -1).contiguous().cpu()
    metadata = {str(k): str(v) for k, v in metadata.items()}
    metadata[BASE_TERMS_META] = base_info or "top-r SVD of the base weights"
    os.makedirs(os.path.dirname(os.path.abspath(dst_path)), exist_ok=True)
    tmp = dst_path + ".tmp"
    save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata)
    os.replace(tmp, dst_path)
    return dst_path
