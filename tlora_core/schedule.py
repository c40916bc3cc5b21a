"""The T-LoRA rank schedule: how many ranks are active at a given noise level.

The formula is the one the trainers run (LyCORIS ``compute_timestep_mask``, SimpleTuner,
the official code, the kohya forks)::

    u = clamp((T - t) / (T - b), 0, 1)      # 1 = clean image, 0 = pure noise
    r = min(R, floor(u ** alpha * (R - r_min)) + r_min)

with t the trainer's timestep (plus its offset, truncated to an integer where the trainer does)
and b the boundary below which every rank is on (0 for all but takenoko's boundary schedule).

A file whose modules have different ranks follows one of two rules, by trainer: LyCORIS builds one
mask of length R (the largest rank) and each module uses its first ranks, ``min(r, R_m)``; the
kohya-style trainers (sd-scripts forks, takenoko, Fizgig) build each module's mask from its own
rank, ``r(t)`` with ``R = R_m`` (``per_module_rank``; ``for_module_rank``).

Everything here is plain Python/torch so the schedule can be computed, tested and charted
without ComfyUI. Rank arithmetic is done in float64 (Python floats), like the trainers, so that
boundary cases (e.g. ``0.75 * 64 == 48``) land on the same integer.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch

TIMESTEP = "timestep"
STEP_INDEX = "step_index"
MODES = (TIMESTEP, STEP_INDEX)


@dataclass(frozen=True)
class Schedule:
    """Schedule parameters, plus where each value came from (shown to the user)."""

    max_rank: int
    min_rank: int = 1
    alpha: float = 1.0
    mode: str = TIMESTEP
    max_timestep: float = 1000  # T; 1.0 where the model's own time runs over [0, 1] (the Anima fork)
    # LyCORIS/SimpleTuner truncate t to an int before the formula; the official SDXL code does not.
    truncate_timestep: bool = True
    timestep_offset: float = 0.0  # added to t first (takenoko trains with t = 1000 * sigma + 1)
    boundary_timestep: float = 0.0  # b: ranks are reduced only for t > b (takenoko: 875)
    per_module_rank: bool = False  # each module's mask from its own rank (kohya-style), not min(r, R_m)
    sources: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        if not 0 <= self.min_rank <= self.max_rank:
            raise ValueError(f"min_rank must be in [0, max_rank={self.max_rank}], got {self.min_rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha (the schedule exponent) must be a positive number, got {self.alpha}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.max_timestep > 0 and math.isfinite(self.max_timestep)):
            raise ValueError(f"max_timestep (T) must be a positive number, got {self.max_timestep}")
        if not 0 <= self.boundary_timestep < self.max_timestep:
            raise ValueError(f"boundary_timestep must be in [0, max_timestep={self.max_timestep:g}), "
                             f"got {self.boundary_timestep:g}")
        if not math.isfinite(self.timestep_offset):
            raise ValueError(f"timestep_offset must be a number, got {self.timestep_offset}")

    def with_overrides(self, source: str, **values) -> "Schedule":
        """A copy with ``values`` replaced (None = keep) and their source recorded."""
        values = {k: v for k, v in values.items() if v is not None}
        sources = dict(self.sources)
        sources.update({k: source for k in values})
        return replace(self, sources=sources, **values)

    def describe(self) -> str:
        return ", ".join(f"{name}={value} ({where})" for name, value, where in self.fields())

    def fields(self) -> list[tuple[str, object, str]]:
        """(name, value, where it came from) of each setting, for the user."""
        names = ["max_rank", "min_rank", "alpha", "mode", "max_timestep", "truncate_timestep"]
        names += [n for n in ("timestep_offset", "boundary_timestep", "per_module_rank")
                  if getattr(self, n) or n in self.sources]
        return [(n, _shown(getattr(self, n)), self.sources.get(n, "default")) for n in names]


    def for_module_rank(self, module_rank: int) -> "Schedule":
        """The schedule a module of rank ``module_rank`` follows under ``per_module_rank``: R is the
        module's own rank (min_rank capped at it, as the kohya-style trainers clamp it)."""
        if not self.per_module_rank or module_rank == self.max_rank:
            return self
        return replace(self, max_rank=module_rank, min_rank=min(self.min_rank, module_rank))


def _shown(value):
    return f"{value:g}" if isinstance(value, float) else value


def rank_at_progress(u: float, max_rank: int, min_rank: int, alpha: float) -> int:
    """Active rank for progress ``u`` in [0, 1] (0 = pure noise, 1 = clean)."""
    u = min(max(u, 0.0), 1.0)
    return min(max_rank, int(math.floor(u**alpha * (max_rank - min_rank))) + min_rank)


def rank_at_timestep(t: float, schedule: Schedule) -> int:
    """Active rank at the trainer's timestep ``t`` (0 = clean, T = pure noise), before its offset."""
    t = t + schedule.timestep_offset
    if schedule.truncate_timestep:
        t = float(int(t))
    T, b = schedule.max_timestep, schedule.boundary_timestep
    return rank_at_progress((T - t) / (T - b), schedule.max_rank, schedule.min_rank, schedule.alpha)


def rank_at_step(step: int, num_steps: int, schedule: Schedule) -> int:
    """Active rank at denoising step ``step`` of ``num_steps`` (the step-index schedule).

    Step i stands for the timestep ``T * (1 - i / N)`` of an evenly spaced ladder, so step 0 runs
    ``min_rank`` and the ranks grow towards the last step, whatever the scheduler's sigmas are.
    """
    if num_steps <= 0:
        return schedule.max_rank
    return rank_at_progress(step / num_steps, schedule.max_rank, schedule.min_rank, schedule.alpha)


def step_index(sigma: float, sample_sigmas: Sequence[float]) -> int:
    """Index of the sampling step that ``sigma`` belongs to.

    ``sample_sigmas`` is the sampler's schedule (descending, ending in the final sigma). A sigma at
    a scheduled value gets that step; one between two scheduled values (Heun's, DPM 2S's inner
    evaluations) belongs to the step it lies in. Locating sigma, rather than counting calls, keeps
    multi-evaluation samplers and CFG batching on the right step.
    """
    n = len(sample_sigmas) - 1
    if n <= 0:
        return 0
    # ascending copy for bisect; tolerance absorbs float round-off in the sampler's arithmetic
    asc = [-float(s) for s in sample_sigmas]
    tol = 1e-6 * max(1.0, abs(float(sample_sigmas[0])))
    gaps = [a - b for a, b in zip(asc[1:], asc) if a > b]
    if gaps:  # never let the tolerance reach a neighbouring scheduled sigma
        tol = min(tol, 0.5 * min(gaps))
    i = bisect.bisect_right(asc, -float(sigma) + tol) - 1
    return min(max(i, 0), n - 1)


def ranks_for_timesteps(timesteps: Iterable[float], schedule: Schedule) -> list[int]:
    return [rank_at_timestep(float(t), schedule) for t in timesteps]


def ranks_for_sigmas_by_step(sigmas: Iterable[float], sample_sigmas: Sequence[float], schedule: Schedule) -> list[int]:
    n = len(sample_sigmas) - 1
    return [rank_at_step(step_index(float(s), sample_sigmas), n, schedule) for s in sigmas]


def ranks_by_module_rank(ranks: Callable[[Schedule], list[int]], schedule: Schedule,
                         module_ranks: Iterable[int]) -> dict[int, list[int]]:
    """Module rank R_m -> the active rank per batch element of modules of that rank; ``ranks(s)``
    evaluates schedule ``s`` at the call's noise levels."""
    shared = ranks(schedule)
    if not schedule.per_module_rank:
        return {R: [min(r, R) for r in shared] for R in module_ranks}
    return {R: shared if R == schedule.max_rank else ranks(schedule.for_module_rank(R)) for R in module_ranks}


TABLE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.999)


def rank_table(schedule: Schedule, timesteps: Sequence[float] | None = None) -> list[tuple[float, int]]:
    """(t, active rank) pairs, e.g. for the README table and the node's info text; by default at
    0, 1/4, 1/2, 3/4 and 0.999 of T (0, 250, 500, 750, 999 for T = 1000)."""
    if timesteps is None:
        timesteps = [round(f * schedule.max_timestep, 6) for f in TABLE_FRACTIONS]
    return [(t, rank_at_timestep(t, schedule)) for t in timesteps]
