"""What the nodes share: their menu category, the schedule socket type, and the loras-folder input."""

from __future__ import annotations

from comfy_api.latest import io

import folder_paths

CATEGORY = "loaders/T-LoRA"

TLoraScheduleType = io.Custom("TLORA_SCHEDULE")


def lora_path(lora_name: str) -> str:
    """A file of ComfyUI's ``loras`` model folder(s) only: no other paths."""
    if lora_name not in folder_paths.get_filename_list("loras"):
        raise ValueError(f"T-LoRA Loader: {lora_name!r} is not in the loras model folder "
                         f"({', '.join(folder_paths.get_folder_paths('loras'))})")
    return folder_paths.get_full_path_or_raise("loras", lora_name)


def check_lora_name(lora_name) -> bool | str:
    """``validate_inputs`` of the nodes taking a ``lora_name``: checked when the prompt is queued
    (ComfyUI does not check V3 combo values itself)."""
    if lora_name is None or lora_name in folder_paths.get_filename_list("loras"):
        return True
    return f"{lora_name!r} is not a file of the loras model folder"


def lora_name_input(tooltip: str) -> io.Combo.Input:
    """The ``lora_name`` input: a file of the loras model folder (listed when the node is defined)."""
    return io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip=tooltip)
