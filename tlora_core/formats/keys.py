"""A file's tensor keys: grouped by module, and a module's low-rank pair read and checked."""

from __future__ import annotations

import torch

from .errors import TLoRAFormatError


def group_keys(tensors: dict, suffixes: tuple) -> dict:
    """module name -> {suffix: tensor} for keys ending in one of ``suffixes`` (longest first)."""
    order = sorted(suffixes, key=len, reverse=True)
    out = {}
    for k, v in tensors.items():
        for s in order:
            if k.endswith("." + s):
                out.setdefault(k[: -len(s) - 1], {})[s] = v
                break
    return out


def pair(path: str, mod: str, g: dict, down: str = "down.weight", up: str = "up.weight") -> tuple[torch.Tensor, torch.Tensor]:
    """A module's ``down`` / ``up`` terms, checked to be both there and a 2-D rank-r pair."""
    if not (down in g and up in g):
        raise TLoRAFormatError(path, f"module {mod} lacks {up if down in g else down}")
    d, u = g[down], g[up]
    if d.ndim != 2 or u.ndim != 2 or u.shape[1] != d.shape[0]:
        raise TLoRAFormatError(path, f"module {mod}: rank mismatch: {down} {tuple(d.shape)}, {up} {tuple(u.shape)}")
    return d, u


def sample_names(names, n: int = 4) -> str:
    """A few names for a message: ``a, b, c, d ...``."""
    names = sorted(names)
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")
