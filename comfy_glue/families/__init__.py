"""What the pack knows per model family, one small module each: the names trainers use for its
layers where ComfyUI's own key map lacks them, and how its trainers measure time.

``for_model(model)`` finds the family of a ComfyUI ``BaseModel`` by its class; a family module
defines ``FAMILY`` (a ``Family``). A new family is one new module listed in ``_MODULES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def _no_names(model) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    name: str  # as the loader's info shows it
    model_classes: tuple = ()  # ComfyUI model_base class names
    # model -> {file module name: key map value} for names ComfyUI's key map does not know
    names: Callable = field(default=_no_names, compare=False)


_MODULES: tuple = ()


def _registry() -> list[Family]:
    return [m.FAMILY for m in _MODULES]


def for_model(model) -> Family:
    """The family of ``model`` (a ComfyUI ``BaseModel``); an unnamed one for classes no module lists."""
    cls = type(model).__name__
    for fam in _registry():
        if cls in fam.model_classes:
            return fam
    return Family(cls, (cls,))
