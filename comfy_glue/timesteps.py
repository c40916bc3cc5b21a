"""Noise level -> trainer timestep -> active rank, for every ComfyUI model-sampling class.

The one place that knows how ComfyUI's sampling objects relate sigma to the trainers' t:
- flow / CONST models (Flux, SD3, Wan, AuraFlow, ...): the trainers use t = T * sigma. ComfyUI's
  own ``timestep(sigma)`` is not that (Flux returns sigma, SD3 1000 * sigma, some multiplier 1),
  so it is never used for them.
- discrete eps / v models (SD1.x, SDXL): the scheduler timestep, ``model_sampling.timestep(sigma)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import comfy.model_sampling

from ..tlora_core import schedule as sched


def is_flow(model_sampling) -> bool:
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def timesteps_from_sigmas(model_sampling, sigmas: torch.Tensor, max_timestep: int) -> list[float]:
    """The trainer's timestep t for each sigma (one host sync for the batch)."""
    sigmas = sigmas.detach().reshape(-1).float()
    if is_flow(model_sampling):
        t = sigmas * max_timestep
    else:
        t = model_sampling.timestep(sigmas).float()
    return t.cpu().tolist()


def active_ranks(model_sampling, sigmas: torch.Tensor, schedule: sched.Schedule,
                 sample_sigmas: Optional[Sequence[float]] = None) -> Optional[list[int]]:
    """Active rank per batch element, or None when the schedule cannot be evaluated.

    The step-index schedule needs the sampler's sigmas (``transformer_options["sample_sigmas"]``);
    without them (a model call outside sampling) there is no defined rank.
    """
    if schedule.mode == sched.STEP_INDEX:
        if sample_sigmas is None:
            return None
        ss = [float(s) for s in torch.as_tensor(sample_sigmas).reshape(-1).tolist()]
        return sched.ranks_for_sigmas_by_step(sigmas.reshape(-1).float().cpu().tolist(), ss, schedule)
    return sched.ranks_for_timesteps(timesteps_from_sigmas(model_sampling, sigmas, schedule.max_timestep), schedule)
