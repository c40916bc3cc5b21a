"""Apply a T-LoRA to a ComfyUI MODEL: the right rank mask on every sampling call, leak-free.

The only module that knows ComfyUI's sampler internals. ``apply_tlora`` returns a clone carrying
one ``TLoraPatch`` (the adapters, the schedule, the strength: shared by the clone's descendants,
never copied) and three ways in:

- per model call, the one path: ``TLoraWrapper`` is the clone's ``model_function_wrapper``
  (chaining the one that was there). It turns the call's sigmas into active ranks
  (``timesteps.active_ranks``), makes the call's diffusion model carry them
  (``TLoraPatch.carrying``: its layers' hooks, or its merged weights), and calls through;
- per sampling run, a keyed ``OUTER_SAMPLE`` wrapper (``TLoraPatch.sampling_run``) opens a ``Run``
  and closes it in ``finally``, whatever ends the run: hooks removed, merged weights restored.
  A run reaches every diffusion model its calls use, one ``Layers`` each, made at that model's first
  call: with multi-GPU sampling (ComfyUI >= 0.28) each device has its own model copy and calls the
  wrapper from its own thread;
- per model load, the wrapper's ``.to(device)`` / ``.to(dtype)`` (ComfyUI calls them when it loads
  the model) copies the adapters to that device; the ``ON_DETACH`` callback frees them on unload.

A keyed ``APPLY_MODEL`` wrapper is the safety net for a node that replaced the
``model_function_wrapper`` without chaining ours: inside a run of ours it takes the same per-call
path (``carrying``) from ``apply_model``'s own sigma, and says so once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import uuid
from dataclasses import dataclass
from typing import Optional

import torch

from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..tlora_core import runtime as rt
from ..tlora_core.adapter import BoundAdapter, LowRankAdapter
from ..tlora_core.schedule import Schedule
from . import merge as merge_mode
from . import timesteps
from .hooks import OFF, CallState, LayerHooks

log = logging.getLogger("comfyui_tlora")

KEY_PREFIX = "tlora:"


@dataclass
class Entry:
    index: int  # position in the patch's adapter list
    out_slice: Optional[tuple[int, int]]
    adapter: LowRankAdapter


class TLoraPatch:
    """One applied T-LoRA: adapters grouped by layer, its schedule and strength, their copies on each
    device, and the sampling runs open now. Immutable but for those caches and runs."""

    def __init__(self, targets: list[BoundAdapter], schedule: Schedule, strength: float, name: str, merge: bool):
        self.name = name
        self.key = f"{KEY_PREFIX}{name}:{uuid.uuid4().hex[:8]}"
        self.schedule = schedule
        self.strength = float(strength)
        self.merge = merge
        self.modules: dict[str, list[Entry]] = {}
        self._sources: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in targets:
            entry = Entry(len(self._sources), tuple(t.out_slice) if t.out_slice is not None else None, t.adapter)
            self._sources.append((t.adapter.down, t.adapter.up))
            self.modules.setdefault(t.module, []).append(entry)
        self.module_ranks = sorted({t.adapter.rank for t in targets})
        self.runs: list[Run] = []  # open sampling runs, innermost last
        self._copies: dict[torch.device, tuple[torch.dtype, list]] = {}  # device -> (dtype, prepared adapters)
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    # --- per model call ---------------------------------------------------------------------
    @contextlib.contextmanager
    def carrying(self, base_model, sigmas, transformer_options: dict, device: torch.device):
        """The call's diffusion model carries this call's ranks while the block runs."""
        run = self.runs[-1] if self.runs else None
        if base_model is None and run is not None:
            base_model = run.base_model
        state = self._state_for(getattr(base_model, "model_sampling", None), sigmas, transformer_options)
        dm = getattr(base_model, "diffusion_model", None)
        if dm is None:  # a call we cannot place (outside any run, through a foreign apply_model)
            yield
            return
        layers = run.layers_for(dm) if run is not None else self.open_layers(dm, merge=False)
        saved = layers.enter(state, device)
        try:
            yield
        finally:
            layers.leave(saved)
            if run is None:
                layers.close()  # a call outside any run of ours: nothing outlives it

    def calling(self, base_model) -> bool:
        """Whether a call of ours is in progress on this model, in the innermost run."""
        run = self.runs[-1] if self.runs else None
        dm = getattr(base_model, "diffusion_model", None)
        return run is not None and dm is not None and run.calling(dm)

    def _state_for(self, model_sampling, sigmas, transformer_options):
        ranks = None
        if model_sampling is not None and sigmas is not None:
            ranks = timesteps.module_active_ranks(model_sampling, torch.as_tensor(sigmas), self.schedule,
                                                  self.module_ranks, transformer_options.get("sample_sigmas"))
        if ranks is None:
            self.warn_once("no-sigma", "a model call without a known noise level (no sampler sigmas): "
                           "the T-LoRA adds nothing to it")
            return OFF
        return CallState(ranks)

    # --- per sampling run -------------------------------------------------------------------
    def sampling_run(self, executor, *args, **kwargs):
        """OUTER_SAMPLE: open a run for this sampling; close it whatever ends the sampling."""
        patcher = getattr(executor.class_obj, "model_patcher", None)
        if patcher is None:
            return executor(*args, **kwargs)
        run = Run(self, patcher.model, merge_refused=_merge_refused(patcher) if self.merge else None)
        self.runs.append(run)
        try:
            return executor(*args, **kwargs)
        finally:
            self.runs.remove(run)
            run.close()

    def open_layers(self, diffusion_model, merge: bool, merge_refused: Optional[str] = None) -> "Layers":
        merged = None
        if merge:
            merged = merge_mode.MergedRun(self.key, diffusion_model, self.modules, self.strength, self.adapters_on)
            if merge_refused:
                merged.refuse(merge_refused)
        return Layers(self, diffusion_model, merged)

    # --- adapters on each device ------------------------------------------------------------
    def adapters_on(self, device: torch.device, dtype: torch.dtype) -> list:
        """The adapters in this dtype on this device: one copy per device (none where they match),
        made on first use, or in the model load (``TLoraWrapper.to``)."""
        held = self._copies.get(device)
        if held is not None and held[0] == dtype:
            return held[1]
        with self._lock:  # two devices' threads may both miss
            held = self._copies.get(device)
            if held is None or held[0] != dtype:
                with torch.inference_mode(False):  # usable whether or not the next run is in inference mode
                    prepared = [rt.Prepared(d.to(device=device, dtype=dtype).contiguous(),
                                            u.to(device=device, dtype=dtype).contiguous()) for d, u in self._sources]
                held = self._copies[device] = (dtype, prepared)
        return held[1]

    def on_detach(self, model_patcher, unpatch_all: bool):
        """ComfyUI's ON_DETACH callback. An unload (weights restored: ``unpatch_all``) takes the model
        off its device: free the adapters' copies there too. A detach without it is the reload of a
        clone of the same model (each sampling run does it), whose weights stay where they are."""
        if unpatch_all:
            self._copies.pop(_as_activation_device(getattr(model_patcher, "load_device", None)), None)

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("T-LoRA %r: %s", self.name, message)


class Run:
    """One sampling run of a patch: its ``Layers`` on each diffusion model the run's calls use."""

    def __init__(self, patch: TLoraPatch, base_model, merge_refused: Optional[str]):
        self.patch = patch
        self.base_model = base_model  # the sampled model's (a call whose apply_model does not say which)
        self._merge_refused = merge_refused  # None: per layer; "": merge; else why merging is refused
        self._layers: dict[int, Layers] = {}  # id(diffusion model) -> its Layers
        self._lock = threading.Lock()

    def layers_for(self, diffusion_model) -> "Layers":
        layers = self._layers.get(id(diffusion_model))
        if layers is None:
            with self._lock:  # each device's thread opens its own model's, once
                layers = self._layers.get(id(diffusion_model))
                if layers is None:
                    layers = self._layers[id(diffusion_model)] = self.patch.open_layers(
                        diffusion_model, self._merge_refused is not None, self._merge_refused)
        return layers

    def calling(self, diffusion_model) -> bool:
        layers = self._layers.get(id(diffusion_model))
        return layers is not None and layers.state is not None

    def close(self) -> None:
        """Hooks removed and merged weights restored on every model of the run, whatever fails."""
        errors = []
        for layers in self._layers.values():
            try:
                layers.close()
            except BaseException as e:  # close the others anyway
                errors.append(e)
        self._layers = {}
        if errors:
            raise errors[0]


class Layers:
    """A patch on one diffusion model for one run (or one call): by its merged weights where merge
    mode can carry the call's rank, else by forward hooks (made when first needed)."""

    def __init__(self, patch: TLoraPatch, diffusion_model, merged: Optional[merge_mode.MergedRun]):
        self.patch, self.dm, self.merged = patch, diffusion_model, merged
        self.hooks: Optional[LayerHooks] = None
        self.state = None  # the call in progress on this model (None: none of ours)

    def enter(self, state, device):
        """Carry ``state`` from now on; returns what ``leave`` puts back (a call may run inside another)."""
        if self.merged is not None and self.merged.set_rank(_merge_rank(state), device):
            if state is not OFF:
                state.merged = True  # the weights carry it: the hooks of a nested call add nothing
        elif self.hooks is None:
            if self.merged is not None and self.merged.usable is False:
                self.patch.warn_once("merge", f"merge mode not possible here ({self.merged.why}): applying it per layer")
            self.hooks = LayerHooks(self.dm, self.patch.modules, self.patch.strength, self.patch.adapters_on,
                                    self.patch.warn_once)
        saved, self.state = self.state, state
        if self.hooks is not None:
            self.hooks.state = state
        return saved

    def leave(self, saved) -> None:
        self.state = saved
        if self.hooks is not None:
            self.hooks.state = saved

    def close(self) -> None:
        try:
            if self.merged is not None:
                self.merged.restore()
        finally:
            if self.hooks is not None:
                self.hooks.remove()
                self.hooks = None


def _merge_rank(state) -> Optional[dict]:
    """The ranks merged weights must carry for a call (module rank -> active rank): {} where
    nothing is added, None where the batch mixes ranks (no single weight can carry that)."""
    if isinstance(state, CallState):
        return state.uniform
    return {}


def _merge_refused(model_patcher) -> str:
    """'' where a run of this model may merge; else why it may not."""
    if getattr(model_patcher, "hook_patches", None):  # they rewrite the weights between steps
        return "ComfyUI hooks (keyframed LoRAs) patch the weights during the run"
    return ""


def _as_activation_device(device) -> Optional[torch.device]:
    """A device as activations report it (``cuda`` -> ``cuda:<current>``)."""
    if device is None:
        return None
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class TLoraWrapper:
    """The ``model_function_wrapper`` of a model carrying a T-LoRA: the one per-call path."""

    def __init__(self, patch: TLoraPatch, prev=None):
        self.patch = patch
        self.prev = prev  # the wrapper that was there (another T-LoRA's, another pack's), called inside ours
        self._loading_to: Optional[torch.device] = None  # the device of a model load in progress

    def __call__(self, apply_model, args):
        base_model = getattr(apply_model, "__self__", None)
        c = args["c"]
        with self.patch.carrying(base_model, args["timestep"], c.get("transformer_options", {}), args["input"].device):
            if self.prev is not None:
                return self.prev(apply_model, args)
            return apply_model(args["input"], args["timestep"], **c)

    def __deepcopy__(self, memo):
        """ComfyUI before 0.28 deep-copies ``model_options`` on every clone: the wrapper is copied,
        the patch it applies is shared (it holds the adapters, and no per-clone state)."""
        return TLoraWrapper(self.patch, copy.deepcopy(self.prev, memo))

    def to(self, device_or_dtype):
        """Honoured by ComfyUI, forwarded down the chain. Loading the model calls ``.to(load device)``
        then ``.to(model dtype)``: the adapters are copied to that device then, in the load, not
        inside the first sampling call. ``.to(offload device)`` keeps them: every sampling run
        detaches and reloads its model that way; an unload frees them (``TLoraPatch.on_detach``)."""
        if self.prev is not None and hasattr(self.prev, "to"):
            self.prev = self.prev.to(device_or_dtype)
        if isinstance(device_or_dtype, (torch.device, str)):
            new = _as_activation_device(device_or_dtype)
            self._loading_to = None if new.type == "cpu" else new
        elif isinstance(device_or_dtype, torch.dtype):
            if self._loading_to is not None and device_or_dtype in merge_mode.COMPUTE_DTYPES:
                self.patch.adapters_on(self._loading_to, device_or_dtype)  # else (fp8 storage...): at the first call
            self._loading_to = None
        return self

    def models(self):
        return self.prev.models() if self.prev is not None and hasattr(self.prev, "models") else []


def _dropped_wrapper_fallback(patch: TLoraPatch):
    """APPLY_MODEL: acts only inside a run of ours where our model_function_wrapper did not run for
    this call (another node replaced it without chaining it)."""

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        base_model = executor.class_obj
        if not patch.runs or patch.calling(base_model):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        patch.warn_once("dropped", "another node replaced the model_function_wrapper without chaining it; "
                        "setting the rank masks from apply_model instead")
        with patch.carrying(base_model, t, transformer_options, x.device):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return apply_model


def _validate(diffusion_model, targets: list[BoundAdapter]) -> None:
    problems = []
    for t in targets:
        try:
            module = diffusion_model.get_submodule(t.module)
        except AttributeError:
            problems.append(f"{t.module}: no such layer in this model")
            continue
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Conv2d) and module.groups == 1:  # its weight as (out, in * kh * kw)
            out_f, in_f = module.out_channels, module.in_channels * math.prod(module.kernel_size)
        elif in_f is None and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            out_f, in_f = weight.shape
        if in_f is None:
            problems.append(f"{t.module}: {type(module).__name__} is neither a linear layer nor a 2-D convolution")
            continue
        off, size = t.out_slice if t.out_slice is not None else (0, out_f)
        ad = t.adapter
        if ad.in_features != in_f or ad.out_features != size or off < 0 or off + size > out_f:
            problems.append(f"{t.module}: adapter {ad.name} is ({ad.out_features}, {ad.in_features}), "
                            f"layer is ({out_f}, {in_f}), slice {t.out_slice}")
    if problems:
        raise ValueError("T-LoRA does not fit this model:\n  " + "\n  ".join(problems))


def apply_tlora(model_patcher, targets: list[BoundAdapter], schedule: Schedule, strength: float, name: str,
                merge: bool = False):
    """A clone of ``model_patcher`` that adds the T-LoRA, masked per sampling call; the input is untouched.

    ``merge``: in sampling runs, merge the active ranks into the adapted weights where possible
    (``merge``; faster on GPUs) instead of adding them at each layer's output.
    Strength 0 (or no targets) returns a plain clone: exactly the base model.
    """
    clone = model_patcher.clone()
    if strength == 0 or not targets:
        return clone
    _validate(clone.get_model_object("diffusion_model"), targets)
    patch = TLoraPatch(targets, schedule, strength, name, merge)
    clone.set_attachments(patch.key, patch)
    clone.set_model_unet_function_wrapper(TLoraWrapper(patch, clone.model_options.get("model_function_wrapper")))
    clone.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, patch.key, patch.sampling_run)
    clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, patch.key, _dropped_wrapper_fallback(patch))
    clone.add_callback_with_key(CallbacksMP.ON_DETACH, patch.key, patch.on_detach)
    return clone


def tlora_patches(model_patcher) -> list[TLoraPatch]:
    """The T-LoRAs applied to a model, in the order they were applied."""
    return [a for k, a in model_patcher.attachments.items() if isinstance(k, str) and k.startswith(KEY_PREFIX)]
