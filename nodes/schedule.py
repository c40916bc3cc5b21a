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


@dataclass(frozen=True)
class ScheduleOverrides:
    """What the T-LoRA Schedule node sets; ``max_rank`` None = the file's rank."""

    max_rank: Optional[int]
    min_rank: int
    alpha: float
    mode: str
    max_timestep: int
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
        return base.with_overrides(self.source, max_rank=self.max_rank, min_rank=self.min_rank, alpha=self.alpha,
                                   mode=self.mode, max_timestep=self.max_timestep)


class TLoraSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoraSchedule",
            display_name="T-LoRA Schedule",
            category=CATEGORY,
            description=(
                "Sets the T-LoRA rank schedule: how many ranks are active at each noise level, "
                "r = min(R, floor(u^alpha * (R - min_rank)) + min_rank) with u = (T - t) / T. "
                "Connect it to a T-LoRA Loader to override the training settings stored with the file."
            ),
            inputs=[
                io.Int.Input("max_rank", default=0, min=0, max=4096,
                             tooltip="R, the number of ranks at the clean end of the schedule. 0 = the file's rank "
                                     "(a smaller value caps the adapter at that many ranks)."),
                io.Int.Input("min_rank", default=1, min=0, max=4096,
                             tooltip="Ranks active at pure noise (t = T). The trainers' default is 1."),
                io.Float.Input("alpha", default=1.0, min=0.05, max=16.0, step=0.05, round=0.01,
                               tooltip="Schedule exponent: 1 = ranks grow linearly as noise falls; >1 = few ranks until "
                                       "late in sampling; <1 = many ranks early."),
                io.Combo.Input("mode", options=list(sched.MODES), default=sched.TIMESTEP,
                               tooltip="timestep: rank from the noise level (LyCORIS, SimpleTuner, the official code). "
                                       "step_index: rank from the position in the sampler's steps (the standalone "
                                       "Flux trainer)."),
                io.Int.Input("max_timestep", default=1000, min=1, max=100000,
                             tooltip="T, the trainer's number of train timesteps (1000 for nearly every trainer)."),
            ],
            outputs=[TLoraScheduleType.Output(display_name="schedule",
                                              tooltip="Schedule overrides for a T-LoRA Loader or the preview.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None):
        """Checked when the prompt is queued (ComfyUI does not check V3 combo values itself)."""
        return True if mode is None or mode in sched.MODES else f"mode must be one of {', '.join(sched.MODES)}, got {mode!r}"

    @classmethod
    def execute(cls, max_rank: int, min_rank: int, alpha: float, mode: str, max_timestep: int) -> io.NodeOutput:
        if max_rank and min_rank > max_rank:
            raise ValueError(f"T-LoRA Schedule: min_rank {min_rank} is above max_rank {max_rank}")
        overrides = ScheduleOverrides(max_rank=max_rank or None, min_rank=min_rank, alpha=float(alpha), mode=mode,
                                      max_timestep=max_timestep)
        # validate the values now (a nominal rank stands in for the file's)
        overrides.resolve(sched.Schedule(max_rank=max(max_rank, min_rank, 1)))
        return io.NodeOutput(overrides)
