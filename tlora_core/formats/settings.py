"""Training settings stored beside the weights (sidecar JSON/YAML files) and how they become a schedule."""

from __future__ import annotations

import json
import os
from typing import Optional

from ..schedule import Schedule


def read_settings_file(p: str) -> Optional[dict]:
    """A JSON or YAML file as a dict, or None when it is unreadable or not a mapping."""
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
        if p.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def find_sidecars(path: str, names: tuple = (), parents: int = 0) -> list[tuple[str, dict]]:
    """Settings files beside the weights: ``<stem>.json|yaml|yml`` and the given names.

    ``parents`` also searches that many parent folders (and their ``logs/``), as trainers write
    ``<run>/checkpoint-N/weights`` next to ``<run>/logs/hparams.yml``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    candidates = [os.path.join(folder, stem + ext) for ext in (".json", ".yaml", ".yml")]
    d = folder
    for level in range(parents + 1):
        for n in names:
            candidates.append(os.path.join(d, n))
            if level > 0 or parents:
                candidates.append(os.path.join(d, "logs", n))
        d = os.path.dirname(d)
    out, seen = [], set()
    for c in candidates:
        if c in seen or not os.path.isfile(c):
            continue
        seen.add(c)
        data = read_settings_file(c)
        if data is not None:
            out.append((c, data))
    return out


def sidecar_label(path: str, sidecar: str) -> str:
    rel = os.path.relpath(sidecar, os.path.dirname(os.path.abspath(path)))
    return f"sidecar {rel}"


def first_number(settings: dict, *names, kind=float):
    """The first of ``names`` in ``settings`` that reads as a number of ``kind`` (None if none does)."""
    for n in names:
        if n in settings and settings[n] is not None and settings[n] != "":
            try:
                return kind(settings[n]) if kind is not int else int(float(settings[n]))
            except (TypeError, ValueError):
                continue
    return None


def finish_schedule(rank: int, found: list, notes: list, module_ranks: tuple = ()) -> Schedule:
    """A Schedule from (source label, {field: value}) pairs, later ones winning; R from the tensors
    (the largest of ``module_ranks``, the modules' own ranks, where they differ).

    min_rank above R (a config for a different rank) is clamped, with a note.
    """
    schedule = Schedule(max_rank=rank, sources={"max_rank": "file tensors"})
    for source, values in found:
        values = {k: v for k, v in values.items() if v is not None}
        if "max_rank" in values:
            if values["max_rank"] != rank and values["max_rank"] not in module_ranks:
                notes.append(f"{source} says rank {values['max_rank']}, the tensors have rank {rank}: "
                             "the tensors' rank is used")
            values.pop("max_rank")
        if values.get("min_rank") is not None and values["min_rank"] > rank:
            notes.append(f"{source} says min_rank {values['min_rank']} > rank {rank}: clamped to {rank}")
            values["min_rank"] = rank
        if values.get("alpha") is not None and not values["alpha"] > 0:
            notes.append(f"{source} gives schedule alpha {values['alpha']}: ignored (must be > 0)")
            values.pop("alpha")
        if values:
            schedule = schedule.with_overrides(source, **values)
    return schedule
