"""T-LoRA Schedule node (thin: inputs, core calls, outputs).

A ``TLORA_SCHEDULE`` value is a :class:`ScheduleOverrides`: the values a user set on the
T-LoRA Schedule node. The loader resolves it against the file's training settings
(file < node; ``max_rank`` 0 keeps the file's rank), so the schedule in effect always says where
each value came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from comfy_api.latest import io

from ..tlora_core import schedule as sched
from .inputs import CATEGORY, TLoraScheduleType

SOURCE = "T-LoRA Schedule node"
# truncate_t: the trainer's rounding of t before the formula ("as in the file": the reader's)
TRUNCATE = {"as in the file": None, "integer": True, "none": False}


@dataclass(frozen=True)
class ScheduleOverrides:
    """What the T-LoRA Schedule node sets; ``max_rank`` None = the file's rank."""

    max_rank: Optional[int]
    min_rank: int
    alpha: float
    mode: str
    max_timestep: float
    boundary_timestep: float = 0.0
    timestep_offset: float = 0.0
    truncate_timestep: Optional[bool] = None  # None: as in the file
    source: str = SOURCE

    def resolve(self, base: sched.Schedule, what: str = "the T-LoRA file") -> sched.Schedule:
        """``base`` (the file's settings) with these values on top."""
        max_rank = base.max_rank if self.max_rank is None else self.max_rank
        if max_rank > base.max_rank:
            raise ValueError(f"{self.source}: max_rank {max_rank} exceeds the rank of {what} ({base.max_rank}); "
                             f"use 0 for the file's rank or a value up to {base.max_rank}")
        if self.min_rank > max_rank:
            raise ValueError(f"{self.source}: min_rank {self.min_rank} is above max_rank {max_rank} "
                             f"({'the rank of ' + what if self.max_rank is None else 'set on the node'})")
        if not 0 <= self.boundary_timestep < self.max_timestep:
            raise ValueError(f"{self.source}: boundary_timestep {self.boundary_timestep:g} must be below max_timestep "
                             f"{self.max_timestep:g}")
        # a max_rank set on the node is the one mask length of every module (each capped at its rank)
        per_module = False if self.max_rank is not None and base.per_module_rank else None
        return base.with_overrides(self.source, max_rank=self.max_rank, min_rank=self.min_rank, alpha=self.alpha,
                                   mode=self.mode, max_timestep=self.max_timestep,
                                   boundary_timestep=self.boundary_timestep, timestep_offset=self.timestep_offset,
                                   truncate_timestep=self.truncate_timestep, per_module_rank=per_module)


class TLoraSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoraSchedule",
            display_name="T-LoRA Schedule",
            category=CATEGORY,
            description=(
                "Sets the T-LoRA rank schedule: how many ranks are active at each noise level, "
                "r = min(R, floor(u^alpha * (R - min_rank)) + min_rank) with u = (T - t) / (T - boundary), "
                "t being the trainer's timestep plus its offset. Connect it to a T-LoRA Loader to override "
                "the training settings stored with the file."
            ),
            inputs=[
                io.Int.Input("max_rank", default=0, min=0, max=4096,
                             tooltip="R, the number of ranks at the clean end of the schedule. 0 = the file's rank "
                                     "(each module's own, where its trainer masks modules by their own "
                                     "rank); a smaller value caps every module at that many ranks."),
                io.Int.Input("min_rank", default=1, min=0, max=4096,
                             tooltip="Ranks active at pure noise (t = T). The trainers' default is 1."),
                io.Float.Input("alpha", default=1.0, min=0.05, max=16.0, step=0.05, round=0.01,
                               tooltip="Schedule exponent: 1 = ranks grow linearly as noise falls; >1 = few ranks until "
                                       "late in sampling; <1 = many ranks early."),
                io.Combo.Input("mode", options=list(sched.MODES), default=sched.TIMESTEP,
                               tooltip="timestep: rank from the noise level (LyCORIS, SimpleTuner, the official code). "
                                       "step_index: rank from the position in the sampler's steps (the standalone "
                                       "Flux trainer)."),
                io.Float.Input("max_timestep", default=1000.0, min=0.001, max=100000.0, step=1.0, round=0.001,
                               tooltip="T, the trainer's timestep at pure noise: 1000 for nearly every trainer; 1 where "
                                       "the model's own time runs from 0 to 1 (the Anima kohya fork)."),
                io.Float.Input("boundary_timestep", default=0.0, min=0.0, max=100000.0, step=1.0, round=0.001, optional=True,
                               tooltip="Every rank is on for t up to this; above it the rank falls to min_rank at t = T "
                                       "(takenoko's boundary schedule: 875). 0 = the usual schedule."),
                io.Float.Input("timestep_offset", default=0.0, min=-100000.0, max=100000.0, step=1.0, round=0.001,
                               optional=True,
                               tooltip="Added to the timestep before the formula (takenoko trains with t = 1000 * "
                                       "sigma + 1)."),
                io.Combo.Input("truncate_t", options=list(TRUNCATE), default="as in the file", optional=True,
                               tooltip="integer: t is truncated to an integer first (LyCORIS, SimpleTuner, kohya); "
                                       "none: t is used as it is (the official code); as in the file: the file "
                                       "format's own rule."),
            ],
            outputs=[TLoraScheduleType.Output(display_name="schedule",
                                              tooltip="Schedule overrides for a T-LoRA Loader or the preview.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None, truncate_t=None):
        """Checked when the prompt is queued (ComfyUI does not check V3 combo values itself)."""
        if mode is not None and mode not in sched.MODES:
            return f"mode must be one of {', '.join(sched.MODES)}, got {mode!r}"
        if truncate_t is not None and truncate_t not in TRUNCATE:
            return f"truncate_t must be one of {', '.join(TRUNCATE)}, got {truncate_t!r}"
        return True

    @classmethod
    def execute(cls, max_rank: int, min_rank: int, alpha: float, mode: str, max_timestep: float,
                boundary_timestep: float = 0.0, timestep_offset: float = 0.0,
                truncate_t: str = "as in the file") -> io.NodeOutput:
        if max_rank and min_rank > max_rank:
            raise ValueError(f"T-LoRA Schedule: min_rank {min_rank} is above max_rank {max_rank}")
        overrides = ScheduleOverrides(max_rank=max_rank or None, min_rank=min_rank, alpha=float(alpha), mode=mode,
                                      max_timestep=float(max_timestep), boundary_timestep=float(boundary_timestep),
                                      timestep_offset=float(timestep_offset), truncate_timestep=TRUNCATE[truncate_t])
        # validate the values now (a nominal rank stands in for the file's)
        overrides.resolve(sched.Schedule(max_rank=max(max_rank, min_rank, 1)))
        return io.NodeOutput(overrides)
