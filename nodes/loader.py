"""T-LoRA Loader node (thin): read the file, bind it to the model, attach the scheduled adapter."""

from __future__ import annotations

import os
from typing import Optional

from comfy_api.latest import io

import folder_paths

from ..comfy_glue import binding, patcher, timesteps
from ..tlora_core import schedule as sched
from ..tlora_core.formats import read_tlora
from .inputs import CATEGORY, TLoraScheduleType, check_lora_name, lora_name_input, lora_path
from .schedule import ScheduleOverrides


def info_text(lora_name: str, tfile, bound, schedule: sched.Schedule, strength: float, model) -> str:
    if schedule.mode == sched.TIMESTEP:
        conv = timesteps.convention(model.get_model_object("model_sampling"))
        time = f"{conv.describe} ({conv.name}), T = {schedule.max_timestep:g}"
    else:
        time = "the step's position in the sampler's schedule (step_index)"
    lines = [
        f"T-LoRA: {lora_name}",
        f"format: {tfile.format}, rank {tfile.rank}, strength {strength:g}",
        f"model: {bound.family}; mask timestep: {time}",
        f"modules: {len(bound.matched)} matched, {len(bound.unmatched)} not matched",
    ]
    if bound.unmatched:
        shown = ", ".join(list(bound.unmatched)[:8])
        lines.append(f"  not matched: {shown}{' ...' if len(bound.unmatched) > 8 else ''}")
    lines.append("schedule in effect:")
    for name, value, where in schedule.fields():
        lines.append(f"  {name} = {value}  ({where})")
    if schedule.mode == sched.TIMESTEP:
        # where each module follows its own rank, one line per rank the file's modules have
        ranks = sorted({m.rank for m in tfile.modules.values()}, reverse=True) if schedule.per_module_rank else []
        for R in ranks if len(ranks) > 1 else [schedule.max_rank]:
            label = f"active rank at t (modules of rank {R})" if len(ranks) > 1 else "active rank at t"
            table = sched.rank_table(schedule.for_module_rank(R))
            lines.append(f"{label}: " + ", ".join(f"{t:g}: {r}" for t, r in table))
    lines += [f"note: {n}" for n in bound.notes]  # the file's notes and the binding's
    return "\n".join(lines)


APPLY_MODES = ["per layer", "merge"]
MASKS = ["timestep mask", "all ranks"]


class TLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoraLoader",
            display_name="T-LoRA Loader",
            category=CATEGORY,
            description=(
                "Loads a T-LoRA (LyCORIS/SimpleTuner, the official code, the standalone Flux trainer or kohya-style) "
                "from the loras folder and applies it with its timestep-dependent rank mask on every sampling call, "
                "as it was trained. Without a schedule input the file's training settings are used."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the T-LoRA was trained on (SDXL, Flux, ...)."),
                lora_name_input("The T-LoRA file, from the loras model folder. The format is detected."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to apply the T-LoRA (0 = not at all, 1 = as trained)."),
                io.Combo.Input("apply", options=APPLY_MODES, default=APPLY_MODES[0], optional=True,
                               tooltip="per layer: the active ranks are added at each adapted layer's output (any "
                                       "weight format). merge: they are written into the weights for each sampling "
                                       "run, rewritten when the rank changes and restored after it: on a GPU, closer to a "
                                       "merged LoRA's speed, for one more copy of the adapted weights while sampling "
                                       "(plain float weights on the GPU; elsewhere it falls back to per layer)."),
                io.Boolean.Input("allow_partial", default=False, optional=True,
                                 tooltip="Apply the file even when some of its modules have no layer in this model "
                                         "(off: that is an error, since the image would differ from the trained one)."),
                io.Combo.Input("mask", options=MASKS, default=MASKS[0], optional=True,
                               tooltip="timestep mask: the ranks the schedule allows at each step's noise level, as "
                                       "the T-LoRA was trained (and as the paper samples). all ranks: every rank at "
                                       "every step, as a plain LoRA (some trainers' own samplers run it so)."),
                TLoraScheduleType.Input("schedule", optional=True,
                                        tooltip="Overrides for the rank schedule (T-LoRA Schedule node). Without it, "
                                                "the file's training settings are used, else min_rank 1, alpha 1.0, "
                                                "timestep mode, T=1000."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the T-LoRA attached."),
                io.String.Output(display_name="info", tooltip="Format, rank, matched modules and the schedule in "
                                                              "effect, with where each value came from."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None, apply=None, mask=None):
        if apply is not None and apply not in APPLY_MODES:
            return f"apply must be one of {', '.join(APPLY_MODES)}, got {apply!r}"
        if mask is not None and mask not in MASKS:
            return f"mask must be one of {', '.join(MASKS)}, got {mask!r}"
        return check_lora_name(lora_name)

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        """Re-run when the file changes on disk, not only when its name does."""
        try:
            st = os.stat(folder_paths.get_full_path_or_raise("loras", lora_name))
            return (lora_name, st.st_mtime_ns, st.st_size)
        except Exception:
            return lora_name

    @classmethod
    def execute(cls, model, lora_name: str, strength_model: float, apply: str = APPLY_MODES[0],
                allow_partial: bool = False, mask: str = MASKS[0],
                schedule: Optional[ScheduleOverrides] = None) -> io.NodeOutput:
        # a schedule given here says "this is a T-LoRA": layouts plain LoRAs share are accepted then
        tfile = read_tlora(lora_path(lora_name), assume_tlora=schedule is not None)
        effective = tfile.schedule
        if schedule is not None:
            effective = schedule.resolve(effective, lora_name)
        if mask == "all ranks":
            effective = effective.with_overrides("T-LoRA Loader mask: all ranks", min_rank=effective.max_rank)
        # raises, naming the file, when it does not fit this model whole; LyCORIS base terms are cached on
        # disk in <ComfyUI user dir>/tlora_cache ($COMFYUI_TLORA_CACHE overrides it)
        bound = binding.bind_tlora(model, tfile, cache_dir=None, progress=True, allow_partial=allow_partial)
        info = info_text(lora_name, tfile, bound, effective, strength_model, model)
        if strength_model == 0:
            info += "\nstrength 0: the model is left as it was"
        merge = apply == "merge"
        if merge:
            info += "\napplied by merging the active ranks into the weights in each run (falls back to per layer where it cannot)"
        return io.NodeOutput(patcher.apply_tlora(model, bound.targets, effective, strength_model, lora_name, merge=merge), info)
