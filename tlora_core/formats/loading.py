"""Reading a file's tensors safely: safetensors, or a weights-only torch pickle (never executed)."""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from .errors import TLoRAFormatError

PICKLE_EXTS = (".pt", ".pth", ".bin", ".ckpt")


def load_state_dict(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) from a safetensors file or a weights-only torch pickle.

    Pickles are opened only with ``torch.load(weights_only=True)``: a file that needs anything else
    (arbitrary classes, code) is refused, never executed.
    """
    if not os.path.isfile(path):
        raise TLoRAFormatError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise TLoRAFormatError(path, "the file is empty")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return _load_safetensors(path)
    if lower.endswith(PICKLE_EXTS):
        return _load_pickle(path), {}
    with open(path, "rb") as f:  # unknown extension: sniff (zip = torch.save, \x80 = a bare pickle)
        head = f.read(2)
    if head == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        try:
            return _load_pickle(path), {}
        except TLoRAFormatError:
            pass
    return _load_safetensors(path)


def _load_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: header or body unreadable
        raise TLoRAFormatError(path, f"cannot be read as safetensors (truncated or corrupt file?): {e}") from None
    return tensors, metadata


def _load_pickle(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TLoRAFormatError(
            path, "refused: this pickle needs more than plain tensors to load (torch.load(weights_only=True) "
                  f"rejected it), and running its code would be unsafe. Re-save it as safetensors. Detail: {e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise TLoRAFormatError(path, f"cannot be read as a torch file (truncated or corrupt?): {e}") from None
    if isinstance(obj, dict) and len(obj) == 1:
        only = next(iter(obj.values()))
        if isinstance(only, dict):  # {"state_dict": {...}} and the like
            obj = only
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TLoRAFormatError(path, f"a torch file holding {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def check_finite(path: str, tensors: dict) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(sorted(bad)[:5]) + (" ..." if len(bad) > 5 else "")
        raise TLoRAFormatError(path, f"{len(bad)} tensor(s) contain NaN or Inf ({shown}): the training diverged "
                                     "or the file is damaged")
