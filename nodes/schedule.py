"""T-LoRA Schedule and T-LoRA Schedule Preview nodes (thin: inputs, core calls, outputs).

A ``TLORA_SCHEDULE`` value is a :class:`ScheduleOverrides`: the values a user set on the
T-LoRA Schedule node. The loader resolves it against the file's training settings
(file < node; ``max_rank`` 0 keeps the file's rank), so the schedule in effect always says where
each value came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from comfy_api.latest import io, ui

import comfy.samplers

from ..tlora_core import schedule as sched
from . import chart, patcher, sampling

CATEGORY = "loaders/T-LoRA"
SOURCE = "T-LoRA Schedule node"

TLoraScheduleType = io.Custom("TLORA_SCHEDULE")


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


@dataclass(frozen=True)
class LoadedTLora:
    """A T-LoRA the loader attached to a model: its name, schedule in effect and strength."""

    name: str
    schedule: sched.Schedule
    strength: float


def loaded_tloras(model) -> list[LoadedTLora]:
    """The T-LoRAs attached to ``model`` (by T-LoRA Loaders upstream), in the order they were applied."""
    return [LoadedTLora(r.name, r.schedule, r.strength) for r in patcher.tlora_runtimes(model)]


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


def preview_schedules(model, overrides: Optional[ScheduleOverrides]) -> list[tuple[str, sched.Schedule]]:
    """What the preview charts: the schedule input (resolved against the model's T-LoRA), or every
    T-LoRA the loader attached to the model, each with the schedule in effect."""
    loaded = loaded_tloras(model)
    if overrides is not None:
        if overrides.max_rank is None:
            if len(loaded) != 1:
                raise ValueError("T-LoRA Schedule Preview: the schedule's max_rank is 0 (the file's rank), but the model "
                                 f"carries {len(loaded)} T-LoRAs; set max_rank or connect the model from one T-LoRA Loader")
            return [(f"schedule input on {loaded[0].name}", overrides.resolve(loaded[0].schedule, loaded[0].name))]
        return [("schedule input", overrides.resolve(sched.Schedule(max_rank=overrides.max_rank), "the schedule"))]
    if not loaded:
        raise ValueError("T-LoRA Schedule Preview: connect a T-LoRA Schedule, or a model coming from a T-LoRA Loader")
    return [(item.name, item.schedule) for item in loaded]


def sampler_sigmas(model, sampler_name: str, scheduler: str, steps: int, denoise: float):
    """The sigmas KSampler would run for these settings (same code path, nothing is sampled)."""
    return comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                   denoise=denoise).sigmas.float().cpu()


def step_table(model, sigmas, schedules: list[tuple[str, sched.Schedule]]) -> tuple[list[list[int]], str]:
    """Active rank per step for each schedule, and the text table (step, sigma, t, ranks)."""
    ms = model.get_model_object("model_sampling")
    step_sigmas = sigmas[:-1]
    per_schedule = [sampling.active_ranks(ms, step_sigmas, s, sample_sigmas=sigmas) for _, s in schedules]
    T = schedules[0][1].max_timestep
    ts = sampling.timesteps_from_sigmas(ms, step_sigmas, T) if len(step_sigmas) else []
    head = ["step", "sigma", f"t (T={T})"] + [f"rank: {name}" for name, _ in schedules]
    rows = [head]
    for i, sigma in enumerate(step_sigmas.tolist()):
        rows.append([str(i), f"{sigma:.4f}", f"{ts[i]:.1f}"] + [f"{r[i]}/{s.max_rank}" for r, (_, s) in zip(per_schedule, schedules)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines += [""] + [f"{name}: {s.describe()}" for name, s in schedules]
    return per_schedule, "\n".join(lines)


class TLoraSchedulePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoraSchedulePreview",
            display_name="T-LoRA Schedule Preview",
            category=CATEGORY,
            description=(
                "Charts the active T-LoRA rank at every step of a sampler run, for exactly the sigmas KSampler "
                "would use with these settings. Nothing is sampled."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (its noise schedule and shift set the sigmas). "
                                                "From a T-LoRA Loader, its T-LoRAs' schedules are charted."),
                TLoraScheduleType.Input("schedule", optional=True,
                                        tooltip="A schedule to chart instead of the model's T-LoRAs' "
                                                "(max_rank 0 takes the rank of the T-LoRA on the model)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampler, as in KSampler (some samplers drop the penultimate sigma)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="The scheduler, as in KSampler."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of sampling steps, as in KSampler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise, as in KSampler: below 1 only the last steps of a longer schedule run."),
            ],
            outputs=[
                io.Image.Output(display_name="chart", tooltip="Active rank per sampling step."),
                io.String.Output(display_name="table", tooltip="Step, sigma, trainer timestep and active rank per step."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None):
        """Checked when the prompt is queued: KSampler would silently fall back to its first choice."""
        if sampler_name is not None and sampler_name not in comfy.samplers.KSampler.SAMPLERS:
            return f"unknown sampler {sampler_name!r}"
        if scheduler is not None and scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            return f"unknown scheduler {scheduler!r}"
        return True

    @classmethod
    def execute(cls, model, sampler_name: str, scheduler: str, steps: int, denoise: float,
                schedule: Optional[ScheduleOverrides] = None) -> io.NodeOutput:
        schedules = preview_schedules(model, schedule)
        sigmas = sampler_sigmas(model, sampler_name, scheduler, steps, denoise)
        if len(sigmas) < 2:
            raise ValueError(f"T-LoRA Schedule Preview: no steps to run (steps={steps}, denoise={denoise})")
        per_schedule, table = step_table(model, sigmas, schedules)
        series = [chart.Series(name, ranks, s.max_rank) for (name, s), ranks in zip(schedules, per_schedule)]
        image = chart.rank_chart(
            series,
            title=f"T-LoRA active rank per step: {sampler_name} / {scheduler}, {steps} steps, denoise {denoise:g}",
            subtitle=" | ".join(f"{name}: R={s.max_rank} min={s.min_rank} alpha={s.alpha:g} {s.mode} T={s.max_timestep}"
                                for name, s in schedules),
        )
        # the chart shows on the node; the table rides along in the history for API users
        return io.NodeOutput(image, table, ui={**ui.PreviewImage(image, cls=cls).as_dict(), "text": [table]})
