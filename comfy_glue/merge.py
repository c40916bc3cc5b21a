"""Merge mode: for one sampling run, one diffusion model's adapted weights carry the call's active ranks.

Per-layer application (``hooks``) adds two thin matmuls per adapted slice to every model call. On
a GPU those cost more than their FLOPs: at small sizes each is a kernel launch of a launch-bound
run, at large ones each re-reads the layer's input and output. Here each adapted weight slice is
set to ``W0 + s U[:, :k] D[:k]`` when the rank k changes (a few times per run, one GEMM per slice;
``tlora_core.runtime.merge_prefix_``): the calls in between run at a merged LoRA's speed. The
cost is one more copy of the adapted weights on their device while a run lasts.

Only where that is possible and exact: plain float weights on the activations' device (not fp8,
GGUF or offloaded to the CPU), a call whose whole batch has one rank, no other T-LoRA merging the
same weight, and no ComfyUI hooks (keyframed LoRAs) patching the weights during the run.
Everything else is left to the hooks. The weights are restored from the copies
(bit-exact) when the run ends, whatever ends it.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

import comfy.model_management

from ..tlora_core import runtime as rt

log = logging.getLogger("comfyui_tlora")

# a model dtype that activations run in; fp8 / quantized storage computes in another
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the copies may take at most this share of the device's free memory
MAX_FREE_SHARE = 0.8
_MERGING: dict[int, str] = {}  # id(weight) -> key of the T-LoRA whose run merges into it


class MergedRun:
    """The merge state of one T-LoRA on one diffusion model for one sampling run (restored at its end)."""

    def __init__(self, key: str, diffusion_model, modules: dict, strength: float,
                 weights_for: Callable[[torch.device, torch.dtype], list]):
        self.key = key
        self.dm = diffusion_model
        self.modules = modules  # layer path -> the patch's entries (index, out_slice, adapter)
        self.strength = strength
        self.weights_for = weights_for  # the patch's per-device adapter copies
        self.usable: Optional[bool] = None  # decided at the first call (the weights are loaded by then)
        self.why = ""
        self.slots: list = []  # _Slot: a weight (or a slice of it) with its copy and adapters
        self.owners: list[int] = []  # id() of the weights merged into (``_MERGING``)
        self.carried: Optional[dict] = {}  # module rank -> the active rank the weights carry ({}: none)

    def refuse(self, why: str) -> None:
        """This run cannot merge (decided before its first call): every call goes to the hooks."""
        self.usable, self.why = False, why

    def set_rank(self, active: Optional[dict], device: torch.device) -> bool:
        """Make the weights carry ``active`` (module rank -> active rank; {}: the base weights).
        ``None`` (a batch of mixed ranks) and runs that cannot merge put the base weights back and
        return False: hooks then apply it."""
        if self.usable is None:
            self.usable = self._prepare(device)
        if not self.usable:
            return False
        target = {} if active is None else active
        if target != self.carried:
            w0 = self.slots[0].view
            prepared = self.weights_for(w0.device, w0.dtype)
            carried, self.carried = self.carried, None  # unknown until every slice is written (restore() puts all back anyway)
            with torch.no_grad():
                for slot in self.slots:
                    slot.carry(prepared, target, carried, self.strength)
            self.carried = target
        return active is not None

    def restore(self) -> None:
        """The base weights back in place (bit-exact copies), the copies freed."""
        try:
            if self.carried != {}:
                with torch.no_grad():
                    for slot in self.slots:
                        slot.view.copy_(slot.copy)
        finally:
            for o in self.owners:
                _MERGING.pop(o, None)
            self.slots, self.owners, self.carried = [], [], {}

    def _prepare(self, device: torch.device) -> bool:
        slots, owners = [], []
        for path, entries in self.modules.items():
            module = self.dm.get_submodule(path)
            w = getattr(module, "weight", None)
            why = _unmergeable(module, w, device, self.key)
            if why:
                self.why = f"{path}: {why}"
                return False
            owners.append(id(w))
            if w.ndim == 4:  # a convolution: its adapters act on the weight as (out, in * kh * kw)
                w = w.view(w.shape[0], -1)
            spans = sorted(e.out_slice or (0, w.shape[0]) for e in entries)
            if all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:])):  # disjoint: a copy of each slice
                slots += [_Slot(w if e.out_slice is None else w.narrow(0, *e.out_slice), [(e, None)]) for e in entries]
            else:  # adapters overlapping on this weight (e.g. a fused layer's slice and the whole of it)
                slots.append(_Slot(w, [(e, e.out_slice) for e in entries]))
        if len({slot.view.dtype for slot in slots}) > 1:
            self.why = "the adapted weights differ in dtype"
            return False
        need = sum(slot.view.numel() * slot.view.element_size() for slot in slots)
        free = comfy.model_management.get_free_memory(device)
        if need > MAX_FREE_SHARE * free:
            self.why = f"a copy of the adapted weights ({need / 2**20:.0f} MB) does not fit in free memory ({free / 2**20:.0f} MB)"
            return False
        with torch.no_grad():
            for slot in slots:
                slot.copy = slot.view.clone()
        self.slots = slots
        self.owners = owners
        for o in owners:
            _MERGING[o] = self.key
        return True


class _Slot:
    """A weight, or the rows of it one adapter adapts, with its untouched copy; ``parts``: the
    adapters on it, each with its rows in ``view`` (None: all of it)."""

    __slots__ = ("view", "copy", "parts")

    def __init__(self, view: torch.Tensor, parts: list):
        self.view, self.copy, self.parts = view, None, parts

    def carry(self, prepared: list, target: dict, carried: dict, strength: float) -> None:
        """Carry ``target`` (module rank -> active rank), ``carried`` being what it carries now (None:
        unknown, after an error part-way: every slice is rewritten)."""
        def cols(active, e):
            return -1 if active is None else active.get(e.adapter.rank, 0) * e.adapter.group

        ks = [(e, cols(target, e), cols(carried, e), rows) for e, rows in self.parts]
        if len(ks) == 1:
            e, k, c, _ = ks[0]
            rt.merge_prefix_(self.view, self.copy, prepared[e.index], k, strength, c)
        else:  # several adapters on one weight: their deltas summed onto the copy
            rt.merge_sum_(self.view, self.copy, [(prepared[e.index], k, rows) for e, k, _c, rows in ks], strength)


def _unmergeable(module, w, device, key: str) -> str:
    """Why this layer's weight cannot carry the adapter in place ('' if it can)."""
    if w is None:
        return "it has no weight tensor (a quantized layer?)"
    if type(w) not in (torch.Tensor, torch.nn.Parameter):
        return f"its weight is a {type(w).__name__}"
    if w.dtype not in COMPUTE_DTYPES:
        return f"{w.dtype} weights"
    if w.ndim != 2 and not w.is_contiguous():
        return "its convolution weight is not contiguous"
    if w.device != device:
        return f"its weight is on {w.device}, not {device}"
    if getattr(module, "comfy_cast_weights", False):
        return "ComfyUI casts its weight at every call (low-VRAM or dynamic VRAM loading, manual cast)"
    if _MERGING.get(id(w), key) != key:
        return "another T-LoRA merges into it"
    return ""
