"""Noise level -> the trainer's timestep -> active rank, for every ComfyUI model-sampling class.

The one place that knows how ComfyUI's sampling objects relate sigma (what the sampler passes to
the model) to the timestep t the trainers computed the mask from:

- flow matching (``CONST``: Flux, SD3, Wan, Qwen-Image, Z-Image, Lumina 2, LTX, ...): t = T * sigma,
  sigma being the shifted noise level the model is evaluated at (SimpleTuner: 1000 * sigma; a
  trainer whose DiT sees sigma itself stores T = 1). ComfyUI's own ``timestep(sigma)`` is not that
  (Flux returns sigma, SD3 1000 * sigma, Lumina 2 sigma), so it is never used for them;
- discrete eps / v models (SD1.x, SDXL, PixArt): the scheduler timestep, ``model_sampling.timestep``;
- Cosmos-Predict2 (ComfyUI samples it by its EDM sigma): t = sigma, as SimpleTuner trains it
  (``int(sigma_EDM)`` against T = 1000: such files run at nearly full rank, as they were trained);
- Stable Cascade stage C (its model sees the ratio r = t / 999 of a 1000-step DDPM schedule):
  t = 999 * r, the step whose ratio the model is given.

The schedule then adds the trainer's offset and truncation (``tlora_core.schedule``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import comfy.model_sampling

from ..tlora_core import schedule as sched


@dataclass(frozen=True)
class Convention:
    name: str
    describe: str  # for the loader's info (T: the schedule's max_timestep)
    timesteps: Callable  # (model_sampling, sigmas, T) -> t per sigma


FLOW = Convention("flow matching", "t = T * sigma", lambda ms, sigmas, T: sigmas * T)
DISCRETE = Convention("discrete", "t = the scheduler's timestep of sigma", lambda ms, sigmas, T: ms.timestep(sigmas).float())
EDM_SIGMA = Convention("EDM sigma", "t = sigma (SimpleTuner's Cosmos)", lambda ms, sigmas, T: sigmas)
CASCADE = Convention("Stable Cascade", "t = 999 * the model's timestep ratio",
                     lambda ms, sigmas, T: ms.timestep(sigmas).float() * 999.0)


def convention(model_sampling) -> Convention:
    """How this model-sampling class's sigma becomes the trainers' timestep."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return FLOW
    cosmos = getattr(comfy.model_sampling, "COSMOS_RFLOW", None)
    if cosmos is not None and isinstance(model_sampling, cosmos):
        return EDM_SIGMA
    cascade = getattr(comfy.model_sampling, "StableCascadeSampling", None)
    if cascade is not None and isinstance(model_sampling, cascade):
        return CASCADE
    return DISCRETE


def timesteps_from_sigmas(model_sampling, sigmas: torch.Tensor, max_timestep: float) -> list[float]:
    """The trainer's timestep t for each sigma (one host sync for the batch), before the schedule's
    own offset and truncation."""
    sigmas = sigmas.detach().reshape(-1).float()
    return convention(model_sampling).timesteps(model_sampling, sigmas, max_timestep).cpu().tolist()


def active_ranks(model_sampling, sigmas: torch.Tensor, schedule: sched.Schedule,
                 sample_sigmas: Optional[Sequence[float]] = None) -> Optional[list[int]]:
    """Active rank (of a module of the schedule's rank R) per batch element, or None when the
    schedule cannot be evaluated (see ``module_active_ranks``)."""
    by_rank = module_active_ranks(model_sampling, sigmas, schedule, (schedule.max_rank,), sample_sigmas)
    return None if by_rank is None else by_rank[schedule.max_rank]


def module_active_ranks(model_sampling, sigmas: torch.Tensor, schedule: sched.Schedule, module_ranks,
                        sample_sigmas: Optional[Sequence[float]] = None) -> Optional[dict[int, list[int]]]:
    """Module rank -> active rank per batch element (``sched.ranks_by_module_rank``), or None when
    the schedule cannot be evaluated.

    The step-index schedule needs the sampler's sigmas (``transformer_options["sample_sigmas"]``);
    without them (a model call outside sampling) there is no defined rank.
    """
    if schedule.mode == sched.STEP_INDEX:
        if sample_sigmas is None:
            return None
        ss = [float(s) for s in torch.as_tensor(sample_sigmas).reshape(-1).tolist()]
        levels = sigmas.reshape(-1).float().cpu().tolist()
        return sched.ranks_by_module_rank(lambda s: sched.ranks_for_sigmas_by_step(levels, ss, s), schedule,
                                          module_ranks)
    ts = timesteps_from_sigmas(model_sampling, sigmas, schedule.max_timestep)
    return sched.ranks_by_module_rank(lambda s: sched.ranks_for_timesteps(ts, s), schedule, module_ranks)
