"""Rebuilt LyCORIS base terms on disk, keyed by the exact bytes of the base weight.

A reload then needs no SVD, and a changed model is never served stale terms: the key is an
xxh3-128 hash of the weight the SVD read (plus its shape and dtype). ComfyUI loads weights in
inference mode, where tensors have no version counter to memoise on, so every load hashes every
adapted weight; xxh3 is used because it reads an order of magnitude faster than sha1.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

import torch

try:
    import xxhash
except ImportError:  # installed without requirements.txt: sha1, slower but the same behaviour
    xxhash = None

from ..tlora_core import svd

log = logging.getLogger("comfyui_tlora")

CACHE_VERSION = "2"


def fingerprint(w: torch.Tensor) -> str:
    """A 128-bit hash of the exact bytes the SVD sees, plus shape and dtype: the cache key."""
    h = xxhash.xxh3_128() if xxhash is not None else hashlib.sha1()
    h.update(f"{CACHE_VERSION}|{tuple(w.shape)}|{w.dtype}".encode())
    c = w.detach().contiguous()
    if c.device.type != "cpu":
        c = c.cpu()
    h.update(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def default_cache_dir() -> Optional[str]:
    """``$COMFYUI_TLORA_CACHE``, else ``<ComfyUI user dir>/tlora_cache``."""
    env = os.environ.get("COMFYUI_TLORA_CACHE")
    if env:
        return env
    try:
        import folder_paths

        return os.path.join(folder_paths.get_user_directory(), "tlora_cache")
    except Exception:
        return None


class BaseTermsCache:
    """One small safetensors file per (exact base weight, rank, sig_type); ``directory`` None: off."""

    def __init__(self, directory):
        self.dir = directory if directory else None

    def path(self, fp: str, rank: int, sig_type: str) -> Optional[str]:
        return os.path.join(self.dir, f"{fp[:32]}-r{rank}-{sig_type}.safetensors") if self.dir else None

    def get(self, fp, rank, sig_type) -> Optional[svd.BaseTerms]:
        p = self.path(fp, rank, sig_type)
        if not p or not os.path.isfile(p):
            return None
        try:
            from safetensors import safe_open

            with safe_open(p, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fp:
                    return None
                t = {k: f.get_tensor(k) for k in f.keys()}
            return svd.BaseTerms(t["p"], t["lam"], t["q"], [int(i) for i in t["ill"].tolist()],
                                 float(meta.get("est_error", 0)), meta.get("method", "") + " (cached)")
        except Exception as e:  # a damaged cache entry is recomputed
            log.warning("T-LoRA: ignoring unreadable cache entry %s: %s", p, e)
            return None

    def put(self, fp, rank, sig_type, terms: svd.BaseTerms) -> None:
        p = self.path(fp, rank, sig_type)
        if not p:
            return
        try:
            from safetensors.torch import save_file

            os.makedirs(self.dir, exist_ok=True)
            tmp = f"{p}.{os.getpid()}.tmp"
            ill = torch.tensor(terms.ill_conditioned, dtype=torch.int32)
            save_file({"p": terms.p.contiguous(), "lam": terms.lam.contiguous(), "q": terms.q.contiguous(), "ill": ill},
                      tmp, {"fingerprint": fp, "est_error": repr(terms.est_error), "method": terms.method})
            os.replace(tmp, p)
        except OSError as e:
            log.warning("T-LoRA: could not write the base-term cache %s: %s", p, e)
