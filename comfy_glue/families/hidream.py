"""HiDream-I1: ComfyUI's layout is diffusers', and its key map has the lycoris_ names."""

from . import Family

FAMILY = Family("HiDream", ("HiDream",))
