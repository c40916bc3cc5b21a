"""The record every reader returns, and the shared end of a read.

Readers turn a file into a ``TLoRAFile`` whose ``modules`` are complete ``LowRankAdapter``s, or
modules still to be completed from the model's base weights (LyCORIS' ``SvdBaseTerms``), which the
ComfyUI glue does because it knows the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schedule import Schedule
from .keys import sample_names
from .settings import finish_schedule


@dataclass
class TLoRAFile:
    path: str
    format: str  # human-readable, e.g. "LyCORIS tlora (SimpleTuner)"
    rank: int  # R: the schedule's mask length
    modules: dict  # file module name -> LowRankAdapter, or a module completed from the model (LyCORIS)
    schedule: Schedule
    notes: list = field(default_factory=list)
    # file module name -> names to look up in the model's key map, best first
    lookup: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    # diffusion-model modules of the file the pack cannot apply (convolutions of some layouts): loading without
    # them is a partial load, which the loader refuses unless asked for one
    unsupported: list = field(default_factory=list)


def finish(path: str, fmt: str, modules: dict, found: list, notes: list, lookup: dict, metadata: dict,
           convention: str, unsupported: tuple = (), per_module_rank: bool = False, **fixed) -> TLoRAFile:
    """The end of every read: R from the tensors, the schedule from the settings ``found`` (see
    ``settings.finish_schedule``), then the trainer's own convention (``fixed`` values, attributed
    to ``convention``). ``per_module_rank``: the trainer builds each module's mask from its own
    rank (the kohya-style trainers), which matters where the modules' ranks differ."""
    ranks = sorted({m.rank for m in modules.values()})
    rank = ranks[-1]
    if len(ranks) > 1:
        fixed["per_module_rank"] = per_module_rank
        notes.append(f"modules have different ranks {ranks}: " + (
            "each module's mask is computed from its own rank, as the trainer does" if per_module_rank else
            f"the mask has length {rank}, each module uses its first ranks (as lycoris does)"))
    schedule = finish_schedule(rank, found, notes, tuple(ranks)).with_overrides(convention, **fixed)
    return TLoRAFile(path, fmt, rank, modules, schedule, notes, lookup, dict(metadata), list(unsupported))


def note_skipped(notes: list, text_encoder: list, conv: list) -> None:
    """The notes for modules a reader leaves out: text-encoder ones (the schedule acts on the
    diffusion model) and convolution modules of a layout the pack does not apply (LyCORIS' tlora
    convolutions, Tucker LoCon)."""
    if text_encoder:
        notes.append(f"{len(text_encoder)} text-encoder module(s) skipped (the T-LoRA schedule acts on the "
                     f"diffusion model): {sample_names(text_encoder)}")
    if conv:
        notes.append(f"{len(conv)} convolution module(s) of a layout this pack does not apply: {sample_names(conv)}")
