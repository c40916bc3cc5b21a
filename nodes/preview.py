"""T-LoRA Schedule Preview node (thin): the active rank at every step of a KSampler run, charted.

The sigmas are computed exactly as KSampler computes them for these settings (same code, nothing
is sampled); the ranks are the ones the runtime would set (``comfy_glue.timesteps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from comfy_api.latest import io, ui

import comfy.samplers

from ..comfy_glue import patcher, timesteps
from ..tlora_core import chart
from ..tlora_core import schedule as sched
from .inputs import CATEGORY, TLoraScheduleType
from .schedule import ScheduleOverrides


@dataclass(frozen=True)
class LoadedTLora:
    """A T-LoRA the loader attached to a model: its name, schedule in effect and strength."""

    name: str
    schedule: sched.Schedule
    strength: float


def loaded_tloras(model) -> list[LoadedTLora]:
    """The T-LoRAs attached to ``model`` (by T-LoRA Loaders upstream), in the order they were applied."""
    return [LoadedTLora(p.name, p.schedule, p.strength) for p in patcher.tlora_patches(model)]


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
    per_schedule = [timesteps.active_ranks(ms, step_sigmas, s, sample_sigmas=sigmas) for _, s in schedules]
    first = schedules[0][1]
    ts = timesteps.timesteps_from_sigmas(ms, step_sigmas, first.max_timestep) if len(step_sigmas) else []
    head = ["step", "sigma", f"t (T={first.max_timestep:g})"] + [f"rank: {name}" for name, _ in schedules]
    rows = [head]
    for i, sigma in enumerate(step_sigmas.tolist()):
        t = ts[i] + first.timestep_offset
        rows.append([str(i), f"{sigma:.4f}", f"{t:.5g}"] + [f"{r[i]}/{s.max_rank}" for r, (_, s) in zip(per_schedule, schedules)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines += [""] + [f"{name}: {s.describe()}" for name, s in schedules]
    return per_schedule, "\n".join(lines)


def _short(s: sched.Schedule) -> str:
    """A schedule in one line for the chart: R, min, alpha, mode, T, and boundary / offset where set."""
    extra = (f" boundary={s.boundary_timestep:g}" if s.boundary_timestep else "") + (
        f" offset={s.timestep_offset:+g}" if s.timestep_offset else "")
    return f"R={s.max_rank} min={s.min_rank} alpha={s.alpha:g} {s.mode} T={s.max_timestep:g}{extra}"


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
            subtitle=" | ".join(f"{name}: {_short(s)}" for name, s in schedules),
        )
        # the chart shows on the node; the table rides along in the history for API users
        return io.NodeOutput(image, table, ui={**ui.PreviewImage(image, cls=cls).as_dict(), "text": [table]})
