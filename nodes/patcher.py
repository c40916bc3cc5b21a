"""Apply a T-LoRA to a ComfyUI MODEL: the right rank mask on every sampling call, leak-free.

The only module that knows ComfyUI's sampler internals. How a sampling run goes:

1. ``apply_tlora`` returns a clone carrying one ``TLoraRuntime``, registered three ways:
   - as the clone's ``model_function_wrapper`` (chaining the one that was there): for each model
     call it turns the call's sigmas into active ranks (``nodes.sampling.active_ranks``), sets them
     as this T-LoRA's state, calls through and restores the state in ``finally``;
   - as a keyed ``OUTER_SAMPLE`` wrapper: it registers one forward hook per adapted layer on the
     diffusion model when the run starts and removes them in ``finally`` (finished, error or
     interrupt), so nothing outlives the run and nothing acts outside it;
   - as a keyed ``APPLY_MODEL`` wrapper: a fallback that sets the state from ``apply_model``'s own
     sigma when another node replaced ``model_function_wrapper`` without chaining ours.
2. Each hook adds ``strength * U[:, :k] (D[:k] x)`` to its layer's output (into its slice for fused
   qkv / linear1), k = active ranks, computing only the active ranks (``tlora_core.runtime``).
   Output-level adapters never touch the base weights, so fp8 / GGUF / offloaded weights work and
   other clones of the same base model are unaffected.
3. Merge mode (``apply_tlora(merge=True)``, ``nodes.merge``): no hooks; from the run's first call
   the adapted weights carry the call's ranks, rewritten when the rank changes and restored when
   the run ends (finished, error or interrupt). Calls or runs it cannot serve get the hooks.

The runtime is shared by the clone and its descendants (``__deepcopy__`` returns self: ComfyUI
deep-copies ``model_options`` on every clone) and keeps tensors only in its own caches.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Optional

import torch

from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..tlora_core import runtime as rt
from ..tlora_core.adapter import BoundAdapter, LowRankAdapter
from ..tlora_core.schedule import Schedule
from . import merge as merge_mode
from . import sampling

log = logging.getLogger("comfyui_tlora")

KEY_PREFIX = "tlora:"
_OFF = object()  # state: inside a model call whose rank is unknown (already warned): add nothing


def cpu_adapter_threads() -> Optional[int]:
    """Intra-op threads for the adapters' matmuls on the CPU (None: leave torch's setting).

    They are skinny (rows x in x k with k <= 2 * rank) and small, so a second thread gains little;
    but each multi-threaded op is an OpenMP barrier, and on a small busy CPU (another process
    on the other core) every barrier waits a scheduler slice. Measured on a 2-core host
    (benchmarks/cpu_threads.py): one thread saves 3-9% of a run when another process keeps a
    core busy and costs ~1% when the machine is idle. So with <= 2 threads they run on one
    thread; larger CPUs keep torch's threading.
    ``COMFYUI_TLORA_CPU_THREADS=N`` forces N (0 = torch's setting).
    """
    forced = os.environ.get("COMFYUI_TLORA_CPU_THREADS")
    if forced is not None and forced.strip():
        n = int(forced)
        return n if n > 0 else None
    return 1 if torch.get_num_threads() <= 2 else None


@dataclass
class _Entry:
    index: int  # position in the runtime's weight cache
    out_slice: Optional[tuple[int, int]]
    adapter: LowRankAdapter


class _CallState:
    """Active ranks of one model call; masks are built only when the batch mixes ranks."""

    __slots__ = ("ranks", "uniform", "merged", "_masks")

    def __init__(self, ranks: list[int]):
        self.ranks = ranks
        self.uniform = ranks[0] if all(r == ranks[0] for r in ranks) else None
        self.merged = False  # merge mode: the weights carry these ranks, hooks add nothing
        self._masks = {}

    def mask(self, rank_cap: int, group: int, device, dtype) -> torch.Tensor:
        key = (rank_cap, group, device, dtype)
        m = self._masks.get(key)
        if m is None:
            m = self._masks[key] = rt.prefix_mask([min(r, rank_cap) for r in self.ranks], group, dtype, device)
        return m


def _merge_rank(state) -> Optional[int]:
    """The rank merged weights must carry for a call: 0 where nothing is added, None where the
    batch mixes ranks (no single weight can carry that)."""
    if isinstance(state, _CallState):
        return state.uniform
    return 0


class TLoraRuntime:
    """One applied T-LoRA: adapters grouped by layer, its schedule, and per-call / per-run state."""

    def __init__(self, targets: list[BoundAdapter], schedule: Schedule, strength: float, name: str, prev_wrapper=None,
                 merge: bool = False):
        self.name = name
        self.key = f"{KEY_PREFIX}{name}:{uuid.uuid4().hex[:8]}"
        self.schedule = schedule
        self.strength = float(strength)
        self.prev = prev_wrapper
        self.modules: dict[str, list[_Entry]] = {}
        self._sources: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in targets:
            entry = _Entry(len(self._sources), tuple(t.out_slice) if t.out_slice is not None else None, t.adapter)
            self._sources.append((t.adapter.down, t.adapter.up))
            self.modules.setdefault(t.module, []).append(entry)
        self.merge = merge  # merge mode (``nodes.merge``) in sampling runs
        self._state = None  # None (no call of ours running), _OFF, or a _CallState
        self._attached: dict[int, list] = {}  # id(diffusion model) -> [hook handles, refcount]
        self._run_sampling = []  # model_sampling of each open run (innermost last)
        self._merge_runs: list[merge_mode.MergedRun] = []  # merge mode: each open run's state (innermost last)
        self._cache_key = None
        self._cache: list[rt.Prepared] = []
        self._loading_to = None  # the device of a model load in progress (between its two ``to`` calls)
        self._warned: set[str] = set()

    # --- ComfyUI's expectations of a model_function_wrapper ---------------------------------
    def __deepcopy__(self, memo):
        return self  # model_options are deep-copied on every clone; this object is immutable config + run state

    def to(self, device_or_dtype):
        """Honoured by ComfyUI, forwarded down the chain. Loading the model calls ``.to(load device)``
        then ``.to(model dtype)``: the adapters are copied to that device then, in the load (not
        inside the first sampling call, where pageable copies wait for the GPU). ``.to(offload
        device)`` keeps them: every sampling run detaches and reloads its model that way; an unload
        frees them (``on_detach``)."""
        if self.prev is not None and hasattr(self.prev, "to"):
            self.prev = self.prev.to(device_or_dtype)
        if isinstance(device_or_dtype, (torch.device, str)):
            new = torch.device(device_or_dtype)
            if new.type == "cuda" and new.index is None and torch.cuda.is_available():
                new = torch.device("cuda", torch.cuda.current_device())  # as activations report it
            self._loading_to = None if new.type == "cpu" else new
            if self._loading_to is not None and self._cache_key is not None and self._cache_key[0] != new:
                self._cache_key, self._cache = None, []  # loaded onto another device: free the old copies
        elif isinstance(device_or_dtype, torch.dtype):
            if self._loading_to is not None and device_or_dtype in merge_mode.COMPUTE_DTYPES:
                self._weights(self._loading_to, device_or_dtype)  # else (fp8 storage...): at the first call
            self._loading_to = None
        return self

    def on_detach(self, model_patcher, unpatch_all: bool):
        """ComfyUI's ON_DETACH callback. An unload (weights restored: ``unpatch_all``) takes the model
        off its device: free the adapters' copies there too. A detach without it is the reload of a
        clone of the same model (each sampling run does it), whose weights stay where they are."""
        if unpatch_all:
            self._cache_key, self._cache = None, []

    def models(self):
        return self.prev.models() if self.prev is not None and hasattr(self.prev, "models") else []

    # --- per model call ---------------------------------------------------------------------
    def __call__(self, apply_model, args):
        """The model_function_wrapper: set this T-LoRA's ranks for the call, call through, clear."""
        c = args["c"]
        ms = self._model_sampling(apply_model)
        state = self._state_for(ms, args["timestep"], c.get("transformer_options", {}))
        dm = getattr(getattr(apply_model, "__self__", None), "diffusion_model", None)
        state, temp = self._enter_call(state, args["input"].device, dm)
        saved, self._state = self._state, state
        try:
            if self.prev is not None:
                return self.prev(apply_model, args)
            return apply_model(args["input"], args["timestep"], **c)
        finally:
            self._state = saved
            if temp is not None:
                self._detach(temp)

    def _enter_call(self, state, device, diffusion_model):
        """How this call gets its adapters: ``(state, temporary hook handle or None)``. In a merge
        mode run, by the weights where they can carry the call's rank (``state.merged``); else by
        the hooks: the run's, or (outside a run of ours, no OUTER_SAMPLE) hooks for this call."""
        run = self._merge_runs[-1] if self._merge_runs else None
        if run is not None:
            if run.set_rank(_merge_rank(state), device):
                if state is not _OFF:
                    state.merged = True  # the weights carry it: the hooks of a nested call add nothing
                return state, None
            if run.usable is False and run.hooks is None and diffusion_model is not None:
                self._warn_once("merge", f"merge mode not possible here ({run.why}): applying it per layer")
                run.hooks = self._attach(diffusion_model)  # for the rest of the run
        if not self._attached and diffusion_model is not None:
            return state, self._attach(diffusion_model)
        return state, None

    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """APPLY_MODEL fallback: only acts when our model_function_wrapper did not run for this call."""
        if self._state is not None or not (self._attached or self._merge_runs):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self._warn_once("dropped", "another node replaced the model_function_wrapper without chaining it; "
                        "setting the rank masks from apply_model instead")
        ms = getattr(executor.class_obj, "model_sampling", None)
        state = self._state_for(ms, t, transformer_options)
        state, temp = self._enter_call(state, x.device, getattr(executor.class_obj, "diffusion_model", None))
        self._state = state
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self._state = None
            if temp is not None:
                self._detach(temp)

    def _model_sampling(self, apply_model):
        ms = getattr(getattr(apply_model, "__self__", None), "model_sampling", None)
        if ms is None and self._run_sampling:
            ms = self._run_sampling[-1]
        return ms

    def _state_for(self, model_sampling, sigmas, transformer_options):
        ranks = None
        if model_sampling is not None and sigmas is not None:
            ranks = sampling.active_ranks(model_sampling, torch.as_tensor(sigmas), self.schedule,
                                          transformer_options.get("sample_sigmas"))
        if ranks is None:
            self._warn_once("no-sigma", "a model call without a known noise level (no sampler sigmas): "
                            "the T-LoRA adds nothing to it")
            return _OFF
        return _CallState(ranks)

    # --- per sampling run -------------------------------------------------------------------
    def outer_sample_wrapper(self, executor, *args, **kwargs):
        """OUTER_SAMPLE: hook the adapted layers for this run only (merge mode: merge into their
        weights from the first call on); unhook / restore the weights whatever ends the run."""
        patcher = getattr(executor.class_obj, "model_patcher", None)
        handles = run = None
        if patcher is not None:
            dm = patcher.get_model_object("diffusion_model")
            if self.merge:
                run = merge_mode.MergedRun(self.key, dm, self.modules, self.strength, self._weights)
                if getattr(patcher, "hook_patches", None):  # they rewrite weights between steps
                    run.usable, run.why = False, "ComfyUI hooks (keyframed LoRAs) patch the weights during the run"
                self._merge_runs.append(run)
            else:
                handles = self._attach(dm)
            self._run_sampling.append(patcher.get_model_object("model_sampling"))
        try:
            return executor(*args, **kwargs)
        finally:
            if patcher is not None:
                self._run_sampling.pop()
                if run is None:
                    self._detach(handles)
                else:
                    self._merge_runs.pop()
                    try:
                        run.restore()
                    finally:
                        if run.hooks is not None:
                            self._detach(run.hooks)

    def _attach(self, diffusion_model) -> int:
        slot = self._attached.get(id(diffusion_model))
        if slot is None:
            handles = []
            try:
                for path, entries in self.modules.items():
                    module = diffusion_model.get_submodule(path)
                    handles.append(module.register_forward_hook(self._make_hook(entries), with_kwargs=True))
            except BaseException:
                for h in handles:
                    h.remove()
                raise
            slot = self._attached[id(diffusion_model)] = [handles, 0]
        slot[1] += 1
        return id(diffusion_model)

    def _detach(self, model_id: int) -> None:
        slot = self._attached.get(model_id)
        if slot is None:
            return
        slot[1] -= 1
        if slot[1] <= 0:
            del self._attached[model_id]
            for h in slot[0]:
                h.remove()

    # --- per layer call ---------------------------------------------------------------------
    def _make_hook(self, entries: list[_Entry]):
        strength = self.strength
        cpu_threads = cpu_adapter_threads()  # decided once per run (hooks are made per run), not per layer call

        def add(state, x, output):
            prepared = self._weights(x.device, x.dtype)
            r = state.uniform
            if r is not None and output.dtype == x.dtype and output.is_contiguous():
                # the usual call (one noise level for the whole cond/uncond batch)
                x2 = x.reshape(-1, x.shape[-1])
                o2 = output.view(-1, output.shape[-1])
                for e in entries:
                    ad = e.adapter
                    rt.add_prefix_2d_(o2, x2, prepared[e.index], min(r, ad.rank) * ad.group, strength, e.out_slice)
                return
            for e in entries:
                p, ad = prepared[e.index], e.adapter
                if r is not None:
                    rt.add_lowrank_(output, x, p.down, p.up, min(r, ad.rank) * ad.group, strength, e.out_slice)
                else:
                    mask = state.mask(ad.rank, ad.group, x.device, x.dtype)
                    rt.add_lowrank_per_sample_(output, x, p.down, p.up, mask, strength, e.out_slice)

        def hook(module, args, kwargs, output):
            state = self._state
            if state is None:
                self._warn_once("outside", "the diffusion model ran outside a sampler call (no sigma known): "
                                "the T-LoRA adds nothing to it")
                return None
            if state is _OFF or state.merged:
                return None
            x = args[0] if args else kwargs["input"]
            threads = cpu_threads if x.device.type == "cpu" else None
            if threads is None:
                add(state, x, output)
                return None
            saved = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                add(state, x, output)
            finally:
                torch.set_num_threads(saved)
            return None

        return hook

    def _weights(self, device, dtype) -> list:
        """Adapters in the activation dtype on the activation device; one cached copy (none when they match)."""
        if (device, dtype) != self._cache_key:
            with torch.inference_mode(False):  # normal tensors, usable whether or not the next run is in inference mode
                self._cache = [rt.Prepared(d.to(device=device, dtype=dtype).contiguous(), u.to(device=device, dtype=dtype).contiguous())
                               for d, u in self._sources]
            self._cache_key = (device, dtype)
        return self._cache

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("T-LoRA %r: %s", self.name, message)


def _validate(diffusion_model, targets: list[BoundAdapter]) -> None:
    problems = []
    for t in targets:
        try:
            module = diffusion_model.get_submodule(t.module)
        except AttributeError:
            problems.append(f"{t.module}: no such layer in this model")
            continue
        weight = getattr(module, "weight", None)
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if in_f is None and weight is not None and weight.ndim == 2:
            out_f, in_f = weight.shape
        if in_f is None:
            problems.append(f"{t.module}: {type(module).__name__} is not a linear layer")
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
    (``nodes.merge``; faster on GPUs) instead of adding them at each layer's output.
    Strength 0 (or no targets) returns a plain clone: exactly the base model.
    """
    clone = model_patcher.clone()
    if strength == 0 or not targets:
        return clone
    _validate(clone.get_model_object("diffusion_model"), targets)
    runtime = TLoraRuntime(targets, schedule, strength, name, clone.model_options.get("model_function_wrapper"), merge)
    clone.set_model_unet_function_wrapper(runtime)
    clone.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, runtime.key, runtime.outer_sample_wrapper)
    clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, runtime.key, runtime.apply_model_wrapper)
    clone.add_callback_with_key(CallbacksMP.ON_DETACH, runtime.key, runtime.on_detach)
    return clone


def tlora_runtimes(model_patcher) -> list[TLoraRuntime]:
    """The T-LoRAs applied to a model, innermost first (for nodes' info text and tests)."""
    out = []
    for key, wrappers in model_patcher.wrappers.get(WrappersMP.OUTER_SAMPLE, {}).items():
        if isinstance(key, str) and key.startswith(KEY_PREFIX):
            out.extend(w.__self__ for w in wrappers if isinstance(getattr(w, "__self__", None), TLoraRuntime))
    return out


def current_ranks(model_patcher) -> dict[str, Optional[list[int]]]:
    """Per applied T-LoRA, the ranks of the model call in progress (None outside a call)."""
    result = {}
    for r in tlora_runtimes(model_patcher):
        st = r._state
        result[r.name] = list(st.ranks) if isinstance(st, _CallState) else None
    return result
