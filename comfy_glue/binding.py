"""A ``TLoRAFile``'s modules placed on a ComfyUI model's layers: what ``patcher.apply_tlora`` attaches.

Every placement is validated before anything is computed (and long before anything is patched):
shapes, slices of fused layers, ComfyUI's function targets. LyCORIS modules are then completed
from the model's own weights (``base_terms``). Nothing on the model is modified here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..tlora_core.adapter import BoundAdapter, LowRankAdapter
from ..tlora_core.formats import SvdBaseTerms, TLoRAFile, TLoRAFormatError, write_self_contained
from . import base_terms, families
from .base_cache import BaseTermsCache, default_cache_dir
from .key_map import Target, model_key_map, parse_target
from .weights import raw_weight

log = logging.getLogger("comfyui_tlora")


@dataclass
class BoundTLoRA:
    """The file's modules placed on the model."""

    targets: list  # list[BoundAdapter]
    matched: list  # file module names placed on the model
    unmatched: list  # file module names with no layer in this model
    notes: list = field(default_factory=list)
    tfile: Optional[TLoRAFile] = None
    # LyCORIS: file module name -> svd.BaseTerms rebuilt from this model (see save_self_contained)
    base_terms: dict = field(default_factory=dict)
    # what the base weights the SVD read were quantized as (empty: the model's own float weights)
    quantized: list = field(default_factory=list)
    family: str = ""  # the model's family, as the loader's info names it


def bind_tlora(model_patcher, tfile: TLoRAFile, cache_dir=None, progress: bool = True,
               allow_partial: bool = False) -> BoundTLoRA:
    """Map ``tfile``'s modules onto ``model_patcher``'s diffusion model; complete LyCORIS modules.

    Raises ``TLoRAFormatError`` when nothing matches, a module's shape disagrees with its layer, or
    (unless ``allow_partial``) some of the file's diffusion-model modules have no layer here: such a
    load gives another image than the one trained. ``cache_dir``: where rebuilt base terms are kept
    (None: the default, False: no cache).
    """
    family = _family_label(model_patcher.model)
    placed, unmatched = _place(model_patcher.model, tfile)
    if not placed:
        said = families.trained_for_note(tfile.metadata)
        raise TLoRAFormatError(tfile.path, f"nothing matches this model: a {tfile.format} file with "
                                           f"{len(unmatched)} modules, none of which is a layer of this {family} "
                                           f"model (e.g. {', '.join(sorted(unmatched)[:4])})."
                                           + (said or " Was it trained for another model family?"))
    jobs, skipped = _validate(model_patcher, tfile, placed, family)
    missing = sorted(unmatched) + skipped + [f"{n} (a convolution of a layout this pack does not apply)" for n in tfile.unsupported]
    if missing and not allow_partial:
        total = len(tfile.modules) + len(tfile.unsupported)
        raise TLoRAFormatError(tfile.path, f"only {len(jobs)} of the file's {total} diffusion-model modules fit this "
                                           f"{family} model; {len(missing)} have no layer here that can take them "
                                           f"(e.g. {'; '.join(missing[:4])}). Applied without them it would not give "
                                           "the image it was trained for: load it on the model it was trained for, "
                                           "or set allow_partial to apply the rest anyway."
                                           + families.trained_for_note(tfile.metadata))
    notes = list(tfile.notes)
    if skipped:
        notes.append(f"{len(skipped)} module(s) skipped: " + "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))

    lycoris = [(name, tfile.modules[name], tgt) for name, tgt in jobs if isinstance(tfile.modules[name], SvdBaseTerms)]
    cache = BaseTermsCache(default_cache_dir() if cache_dir is None else cache_dir)
    done = base_terms.complete(model_patcher, lycoris, cache, progress)
    targets = [_bound(tfile.modules[name], tgt, done.terms.get(name)) for name, tgt in jobs]

    matched = [name for name, _ in jobs]
    if unmatched:
        msg = (f"partial load (allow_partial): {len(matched)} of {len(tfile.modules)} modules placed on this {family} "
               f"model, {len(unmatched)} have no layer here (e.g. {', '.join(sorted(unmatched)[:3])})")
        notes.append(msg)
        log.warning("T-LoRA %s: %s", os.path.basename(tfile.path), msg)
    if lycoris:
        notes += base_terms.report(done, len(lycoris), os.path.basename(tfile.path))
    return BoundTLoRA(targets, matched, unmatched, notes, tfile, done.terms, sorted(set(done.quantized)), family)


def _family_label(model) -> str:
    fam = families.for_model(model)
    config = type(getattr(model, "model_config", None)).__name__
    return fam.name if config == "NoneType" else f"{fam.name} ({config})"


def _place(model, tfile: TLoRAFile) -> tuple[list[tuple[str, Target]], list[str]]:
    """(file module name, target) for each module the model's key map knows, and the names it does not."""
    key_map = model_key_map(model)
    placed, unmatched = [], []
    for name in tfile.modules:
        for cand in tfile.lookup.get(name) or [name]:
            if cand in key_map:
                placed.append((name, parse_target(key_map[cand])))
                break
        else:
            unmatched.append(name)
    return placed, unmatched


def _validate(model_patcher, tfile: TLoRAFile, placed, family: str):
    """The placements that can be applied exactly, and why others are skipped; raises on shape mismatches."""
    sd_keys = set(model_patcher.model.state_dict().keys())
    problems, skipped, jobs = [], [], []
    for name, tgt in placed:
        mod = tfile.modules[name]
        if not (tgt.key.startswith("diffusion_model.") and tgt.key.endswith(".weight")) or tgt.key not in sd_keys:
            skipped.append(f"{name} -> {tgt.key}")
            continue
        weight, _ = raw_weight(model_patcher, tgt.key)
        if not (weight.ndim == 2 or (weight.ndim == 4 and isinstance(mod, LowRankAdapter) and tgt.piece is None)):
            skipped.append(f"{name} (a {weight.ndim}-D layer: linear and 2-D convolution layers only)")
            continue
        out_f, in_f = weight.shape[0], math.prod(weight.shape[1:])  # a conv's weight as (out, in * kh * kw)
        if tgt.piece is not None:
            dim, _off, size = tgt.piece
            if dim != 0:
                skipped.append(f"{name} (a slice on dim {dim}: unsupported)")
                continue
            out_f = size
        if (mod.out_features, mod.in_features) != (out_f, in_f):
            problems.append(f"{name}: {mod.out_features}x{mod.in_features} in the file, {out_f}x{in_f} in the "
                            f"model ({tgt.key[len('diffusion_model.'):-len('.weight')]})")
            continue
        if tgt.fn is not None and not _is_involution(tgt.fn, out_f):
            skipped.append(f"{name} (ComfyUI maps it through a function this pack cannot invert)")
            continue
        jobs.append((name, tgt))
    if problems:
        raise TLoRAFormatError(tfile.path, f"shape mismatch with this {family} model for {len(problems)} module(s) "
                               f"(trained for a different model?): " + "; ".join(problems[:4])
                               + (" ..." if len(problems) > 4 else ""))
    if not jobs:
        raise TLoRAFormatError(tfile.path, f"no module of this {tfile.format} file can be placed on this {family} "
                                           f"model: " + "; ".join(skipped[:3]))
    return jobs, skipped


def _is_involution(fn, rows: int) -> bool:
    """Whether ``fn`` (a function target) is its own inverse on an (out, in) weight: then it maps the
    file's delta to the model's layout and back, and the adapter's ``up`` can be mapped with it."""
    w = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)
    try:
        once = fn(w)
        return once.shape == w.shape and torch.equal(fn(once), w)
    except Exception:
        return False


def _bound(mod, tgt: Target, terms) -> BoundAdapter:
    adapter = mod.complete_with(terms) if isinstance(mod, SvdBaseTerms) else mod
    if tgt.fn is not None:
        adapter = LowRankAdapter(adapter.name, tgt.fn(adapter.up), adapter.down, adapter.rank, adapter.group)
    module = tgt.key[len("diffusion_model."):-len(".weight")]
    out_slice = (tgt.piece[1], tgt.piece[2]) if tgt.piece is not None else None
    return BoundAdapter(module, out_slice, adapter)


def save_self_contained(bound: BoundTLoRA, dst_path: str) -> str:
    """Write a copy of a LyCORIS file carrying the base terms rebuilt for this model (no SVD later)."""
    if bound.tfile is None or not bound.base_terms:
        raise ValueError("save_self_contained needs a LyCORIS T-LoRA whose base terms were rebuilt")
    if bound.quantized:
        raise ValueError(f"{os.path.basename(bound.tfile.path)}: the base weights are {bound.quantized[0]}, so base "
                         "terms rebuilt from them are approximate; write the copy from the original (unquantized) model")
    return write_self_contained(bound.tfile.path, dst_path, bound.base_terms,
                                f"top-r SVD of the base weights ({len(bound.base_terms)} modules)", allow_partial=True)
