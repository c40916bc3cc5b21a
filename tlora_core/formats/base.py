"""What every format reader shares: the file record, errors, safe loading, sidecars, names.

Readers turn a file into a ``TLoRAFile`` whose ``modules`` are complete ``LowRankAdapter``s, or
``SvdBaseTerms`` when the file lacks its frozen base terms (LyCORIS): those are completed from
the base weight by the ComfyUI glue (``nodes.keymap``), which knows the model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .. import adapter as ad
from .. import svd
from ..schedule import Schedule


class TLoRAFormatError(ValueError):
    """A file that cannot be used as a T-LoRA; the message names the file and what is wrong."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"T-LoRA file {os.path.basename(self.path)!r} ({self.path}): {problem}")


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

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def base_terms(self, base_weight: torch.Tensor, device=None) -> svd.BaseTerms:
        if tuple(base_weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: base weight {tuple(base_weight.shape)} does not match the adapter "
                             f"({self.out_features} out x {self.in_features} in)")
        return svd.base_terms(base_weight, self.rank, self.sig_type, device=device)

    def complete_with(self, terms: svd.BaseTerms) -> ad.LowRankAdapter:
        return ad.ortho(self.name, self.p, self.lam, self.q, terms.p, terms.lam, terms.q, scale=self.scale)

    def complete(self, base_weight: torch.Tensor, device=None) -> ad.LowRankAdapter:
        """The full adapter for this base weight (an fp32 SVD of it, as lycoris-lora took at training)."""
        return self.complete_with(self.base_terms(base_weight, device))


Module = Union[ad.LowRankAdapter, SvdBaseTerms]


@dataclass
class TLoRAFile:
    path: str
    format: str  # human-readable, e.g. "LyCORIS tlora (SimpleTuner)"
    rank: int  # R: the schedule's mask length
    modules: dict  # file module name -> LowRankAdapter | SvdBaseTerms
    schedule: Schedule
    notes: list = field(default_factory=list)
    # file module name -> names to look up in ComfyUI's LoRA key map, best first
    lookup: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def needs_base_weights(self) -> bool:
        return any(isinstance(m, SvdBaseTerms) for m in self.modules.values())


# --- loading ---------------------------------------------------------------------------------
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


# --- sidecar settings ------------------------------------------------------------------------
def _read_settings_file(p: str) -> Optional[dict]:
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
        if p.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def find_sidecars(path: str, names: tuple = (), parents: int = 0) -> list[tuple[str, dict]]:
    """Settings files beside the weights: ``<stem>.json|yaml|yml`` and the given names.

    ``parents`` also searches that many parent folders (and their ``logs/``), as trainers write
    ``<run>/checkpoint-N/weights`` next to ``<run>/logs/hparams.yml``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    candidates = [os.path.join(folder, stem + ext) for ext in (".json", ".yaml", ".yml")]
    d = folder
    for level in range(parents + 1):
        for n in names:
            candidates.append(os.path.join(d, n))
            if level > 0 or parents:
                candidates.append(os.path.join(d, "logs", n))
        d = os.path.dirname(d)
    out, seen = [], set()
    for c in candidates:
        if c in seen or not os.path.isfile(c):
            continue
        seen.add(c)
        data = _read_settings_file(c)
        if data is not None:
            out.append((c, data))
    return out


def sidecar_label(path: str, sidecar: str) -> str:
    rel = os.path.relpath(sidecar, os.path.dirname(os.path.abspath(path)))
    return f"sidecar {rel}"


# --- names -----------------------------------------------------------------------------------
_PREFIXES = ("lycoris_", "lora_unet_", "lora_transformer_")
_STRIP_DOTTED = ("base_model.model.", "transformer.", "unet.", "diffusion_model.", "model.")


def lookup_underscored(name: str) -> list[str]:
    """Key-map names for a kohya/LyCORIS-style module name (``lycoris_a_b_c``)."""
    out = [name]
    for p in _PREFIXES:
        if name.startswith(p):
            rest = name[len(p):]
            if rest.startswith("diffusion_model_"):  # wrapped on ComfyUI's BaseModel itself
                rest = rest[len("diffusion_model_"):]
            out += [q + rest for q in _PREFIXES]
            break
    return list(dict.fromkeys(out))


def lookup_dotted(path: str) -> list[str]:
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
           "base_model.model." + path] + [q + us for q in _PREFIXES]
    return list(dict.fromkeys(out))


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


def down_up(path: str, mod: str, g: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's ``down.weight`` / ``up.weight``, checked to be both there and a rank-r pair."""
    if not ("down.weight" in g and "up.weight" in g):
        raise TLoRAFormatError(path, f"module {mod} lacks {'up' if 'down.weight' in g else 'down'}.weight")
    down, up = g["down.weight"], g["up.weight"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise TLoRAFormatError(path, f"module {mod}: rank mismatch: down {tuple(down.shape)}, up {tuple(up.shape)}")
    return down, up


def first_number(settings: dict, *names, kind=float):
    for n in names:
        if n in settings and settings[n] is not None and settings[n] != "":
            try:
                return kind(settings[n]) if kind is not int else int(float(settings[n]))
            except (TypeError, ValueError):
                continue
    return None


def finish_schedule(rank: int, found: list, notes: list) -> Schedule:
    """A Schedule from (source label, {field: value}) pairs, later ones winning; R from the tensors.

    min_rank above R (a config for a different rank) is clamped, with a note.
    """
    schedule = Schedule(max_rank=rank, sources={"max_rank": "file tensors"})
    for source, values in found:
        values = {k: v for k, v in values.items() if v is not None}
        if "max_rank" in values:
            if values["max_rank"] != rank:
                notes.append(f"{source} says rank {values['max_rank']}, the tensors have rank {rank}: "
                             "the tensors' rank is used")
            values.pop("max_rank")
        if values.get("min_rank") is not None and values["min_rank"] > rank:
            notes.append(f"{source} says min_rank {values['min_rank']} > rank {rank}: clamped to {rank}")
            values["min_rank"] = rank
        if values.get("alpha") is not None and not values["alpha"] > 0:
            notes.append(f"{source} gives schedule alpha {values['alpha']}: ignored (must be > 0)")
            values.pop("alpha")
        if values:
            schedule = schedule.with_overrides(source, **values)
    return schedule


def module_names_sample(names, n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


LORA_LOADER_HINT = "load it with ComfyUI's own LoraLoader (Load LoRA) instead"
