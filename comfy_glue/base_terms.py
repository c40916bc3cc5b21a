"""LyCORIS modules completed from the model: their frozen base terms rebuilt by a partial SVD of each
adapted base weight (the slice, for a fused target), dequantized where it is stored quantized,
computed on the model's load device, one layer at a time with ComfyUI's progress bar, and cached on
disk keyed by the exact weight bytes (``base_cache``), so a reload needs no SVD.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import comfy.utils

from ..tlora_core import svd
from ..tlora_core.formats import SvdBaseTerms
from .base_cache import BaseTermsCache, fingerprint
from .key_map import Target
from .weights import dequantized

log = logging.getLogger("comfyui_tlora")


@dataclass
class Completed:
    """What completing a file's LyCORIS modules found."""

    terms: dict = field(default_factory=dict)  # file module name -> svd.BaseTerms
    quantized: list = field(default_factory=list)  # what the base weights read were stored as
    ill_conditioned: dict = field(default_factory=dict)  # module name -> ill-conditioned boundaries
    cached: int = 0  # how many came from the disk cache


def complete(model_patcher, jobs: list[tuple[str, SvdBaseTerms, Target]], cache: BaseTermsCache,
             progress: bool) -> Completed:
    """Base terms for each ``(name, module, target)``; ``progress``: ComfyUI's progress bar (UI) and
    tqdm's (console), a layer a step."""
    done = Completed()
    device = getattr(model_patcher, "load_device", None)
    ui = comfy.utils.ProgressBar(len(jobs)) if progress and jobs else None
    console = tqdm(total=len(jobs), desc="T-LoRA base terms (SVD)", unit="layer", disable=not (progress and jobs))
    try:
        for name, mod, tgt in jobs:
            _complete_one(model_patcher, name, mod, tgt, cache, device, done)
            if ui is not None:
                ui.update(1)
            console.update(1)
    finally:
        console.close()
    return done


def _complete_one(model_patcher, name, mod, tgt, cache, device, done: Completed) -> None:
    w, kind = dequantized(model_patcher, tgt.key)
    if tgt.piece is not None:
        w = w.narrow(0, tgt.piece[1], tgt.piece[2])
    if tgt.fn is not None:
        w = tgt.fn(w)  # the file's (diffusers) layout of this weight
    if kind:
        done.quantized.append(kind)
    fp = fingerprint(w)
    terms = cache.get(fp, mod.rank, mod.sig_type)
    if terms is None:
        terms = _svd(mod, w, device)
        cache.put(fp, mod.rank, mod.sig_type, terms)
    else:
        done.cached += 1
    del w
    done.terms[name] = terms
    if terms.ill_conditioned:
        done.ill_conditioned[name] = terms.ill_conditioned


def _svd(mod: SvdBaseTerms, w: torch.Tensor, device) -> svd.BaseTerms:
    if device is not None and torch.device(device).type != "cpu":
        try:
            return mod.base_terms(w, device=device)
        except torch.OutOfMemoryError:
            log.warning("T-LoRA: out of memory for the SVD on %s; using the CPU", device)
    return mod.base_terms(w, device="cpu")


def report(done: Completed, total: int, file_name: str) -> list[str]:
    """The loader's notes on the rebuilt base terms (the approximate ones logged as a warning too)."""
    out = [f"base terms of {total} LyCORIS module(s) rebuilt by SVD of the model's weights"
           + (f" ({done.cached} from the cache)" if done.cached else "")]
    if done.quantized:
        out.append(f"{len(done.quantized)} base weight(s) are {sorted(set(done.quantized))[0]}: the SVD used their "
                   "dequantized values, which differ from the weights the T-LoRA was trained on, so its base terms are "
                   "approximate. Write a self-contained copy once from the original weights (T-LoRA Save "
                   "Self-Contained node) and load that instead")
        log.warning("T-LoRA %s: %s", file_name, out[-1])
    if done.ill_conditioned:
        example, ks = next(iter(done.ill_conditioned.items()))
        ranks = ", ".join(str(k) for k in ks[:6]) + (" ..." if len(ks) > 6 else "")
        out.append(f"{len(done.ill_conditioned)} of {total} LyCORIS module(s) have mask boundaries where singular "
                   f"values nearly coincide (e.g. {example} at ranks {ranks}): there the trainer's own fp32 SVD "
                   f"defined the base term only to worse than {svd.REPRODUCIBLE_TOL:g} relative, so tiny differences "
                   "from training are unavoidable (typical of untrained, random weights)")
        log.info("T-LoRA %s: ill-conditioned mask boundaries: %s", file_name, done.ill_conditioned)
    return out
