"""The modules of a kohya-style network file (sd-scripts and the trainers built on it): per module
name, either a plain T-LoRA (``lora_down`` / ``lora_up`` / ``alpha``) or an orthogonal one with its
frozen base stored beside the trained terms (``q_layer`` / ``p_layer`` / ``lambda_layer`` and
``base_q`` / ``base_p`` / ``base_lambda``, each trainer spelling those a little differently).

delta W for mask m, scale = alpha / R (R: the module's rank):
    plain: scale * up diag(m) down
    ortho: scale * (P diag(lambda m) Q - P0 diag(lambda0 m) Q0)
A module carrying both layouts is ortho (takenoko saves its unused ``lora_down``/``lora_up`` too).

On a convolution (sd-scripts' ``conv_dim``) ``lora_down`` is a conv with the layer's kernel, stride and
padding and ``lora_up`` a 1x1 conv; the sd-scripts forks' orthogonal modules store ``q_layer`` already
flattened to (R, in * kh * kw). Both are the same low-rank pair on the weight flattened to
(out, in * kh * kw), which is how they are kept here. A Tucker LoCon (``lora_mid``) is not that
shape: such modules are listed in ``conv``, not applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import adapter as ad
from .errors import TLoRAFormatError
from .keys import group_keys
from .names import underscored

PLAIN = ("lora_down.weight", "lora_up.weight")
ORTHO = ("q_layer.weight", "p_layer.weight", "lambda_layer")
BASE = {"q": ("base_q.weight", "base_q"), "p": ("base_p.weight", "base_p"),
        "lambda": ("base_lambda_buf", "base_lambda", "base_lambda.weight")}
SUFFIXES = PLAIN + ORTHO + ("alpha", "dora_scale", "lora_mid.weight") + tuple(n for names in BASE.values() for n in names)
TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "t_lora_te_")


@dataclass
class Modules:
    adapters: dict = field(default_factory=dict)  # file module name -> LowRankAdapter
    lookup: dict = field(default_factory=dict)  # file module name -> key-map names
    text_encoder: list = field(default_factory=list)
    conv: list = field(default_factory=list)  # diffusion-model convolution modules it cannot apply (Tucker)
    ortho: int = 0  # how many are orthogonal


def read_modules(path: str, tensors: dict, prefixes: tuple = ()) -> Modules:
    """Every module of the file; ``prefixes``: the trainer's own name prefixes (besides the usual
    ``lora_unet_``), mapped onto ComfyUI's ``lora_unet_`` names."""
    out = Modules()
    for name, g in sorted(group_keys(tensors, SUFFIXES).items()):
        if not any(t in g for t in PLAIN + ORTHO):
            continue
        if name.startswith(TE_PREFIXES):
            out.text_encoder.append(name)
            continue
        if "dora_scale" in g:
            raise TLoRAFormatError(path, f"module {name} is DoRA (dora_scale): not supported by the T-LoRA loader")
        if "lora_mid.weight" in g:
            out.conv.append(name)
            continue
        out.adapters[name] = _ortho(path, name, g) if "q_layer.weight" in g else _plain(path, name, g)
        out.ortho += "q_layer.weight" in g
        out.lookup[name] = _names(name, prefixes)
    return out


def _names(name: str, prefixes: tuple) -> list:
    for p in prefixes:
        if name.startswith(p):
            return underscored("lora_unet_" + name[len(p):])
    return underscored(name)


def _alpha(g: dict, rank: int) -> float:
    alpha = float(g["alpha"]) if "alpha" in g else 0.0
    return alpha if alpha else float(rank)  # sd-scripts: alpha None or 0 means alpha = rank


def _plain(path: str, name: str, g: dict) -> ad.LowRankAdapter:
    missing = [t for t in PLAIN if t not in g]
    if missing:
        raise TLoRAFormatError(path, f"module {name} lacks {', '.join(missing)}")
    down, up = g["lora_down.weight"], g["lora_up.weight"]
    if down.ndim == 4 and up.ndim == 4 and tuple(up.shape[2:]) == (1, 1):  # a conv module: flattened
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], up.shape[1])
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise TLoRAFormatError(path, f"module {name}: rank mismatch: lora_down {tuple(down.shape)}, "
                                     f"lora_up {tuple(up.shape)}")
    r = down.shape[0]
    return ad.plain(name, up, down, _alpha(g, r) / r)


def _ortho(path: str, name: str, g: dict) -> ad.LowRankAdapter:
    base = {k: next((g[n] for n in names if n in g), None) for k, names in BASE.items()}
    missing = [t for t in ORTHO if t not in g] + [f"base_{k}" for k, t in base.items() if t is None]
    if missing:
        raise TLoRAFormatError(path, f"orthogonal module {name} lacks {', '.join(missing)}")
    q = g["q_layer.weight"]
    r = q.shape[0]
    try:
        return ad.ortho(name, g["p_layer.weight"], g["lambda_layer"], q, base["p"], base["lambda"], base["q"],
                        scale=_alpha(g, r) / r)
    except ValueError as e:
        raise TLoRAFormatError(path, f"module {name}: {e}") from None
