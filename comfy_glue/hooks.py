"""Per-layer application: forward hooks on one diffusion model's adapted layers that add the active
ranks at each layer's output, ``y += s * U[:, :k] (D[:k] x)`` (into its slice for a fused qkv /
linear1), computing only the active ranks (``tlora_core.runtime``).

Output-level adapters never touch the base weights, so fp8 / GGUF / offloaded / dynamically
loaded weights work, and other clones of the same base model are unaffected. What a layer adds is
decided by ``LayerHooks.state``, set by the sampling call in progress (``patcher``).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from ..tlora_core import runtime as rt

OFF = object()  # state: inside a model call whose rank is unknown (already warned): add nothing


class CallState:
    """Active ranks of one model call, by module rank; masks are built only when the batch mixes
    ranks."""

    __slots__ = ("ranks", "uniform", "merged", "_masks")

    def __init__(self, ranks: dict[int, list[int]]):
        self.ranks = ranks  # module rank -> active rank per batch element
        # module rank -> the active rank of every batch element; None: the batch mixes ranks
        self.uniform = {R: rs[0] for R, rs in ranks.items()} if all(len(set(rs)) == 1 for rs in ranks.values()) else None
        self.merged = False  # merge mode: the weights carry these ranks, hooks add nothing
        self._masks = {}

    def mask(self, module_rank: int, group: int, device, dtype) -> torch.Tensor:
        key = (module_rank, group, device, dtype)
        m = self._masks.get(key)
        if m is None:
            m = self._masks[key] = rt.prefix_mask(self.ranks[module_rank], group, dtype, device)
        return m


def cpu_adapter_threads() -> Optional[int]:
    """Intra-op threads for the adapters' matmuls on the CPU (None: leave torch's setting).

    They are skinny (rows x in x k with k <= 2 * rank) and small, so a second thread gains little;
    but each multi-threaded op is an OpenMP barrier, and on a small busy CPU (another process on
    the other core) every barrier waits a scheduler slice. So with <= 2 threads they run on one
    thread; larger CPUs keep torch's threading (benchmarks/cpu_threads.py measures both).
    ``COMFYUI_TLORA_CPU_THREADS=N`` forces N (0 = torch's setting).
    """
    forced = os.environ.get("COMFYUI_TLORA_CPU_THREADS")
    if forced is not None and forced.strip():
        n = int(forced)
        return n if n > 0 else None
    return 1 if torch.get_num_threads() <= 2 else None


class LayerHooks:
    """This T-LoRA's forward hooks on one diffusion model, from ``__init__`` until ``remove()``."""

    def __init__(self, diffusion_model, modules: dict, strength: float,
                 adapters_for: Callable[[torch.device, torch.dtype], list], warn_once: Callable[[str, str], None]):
        self.state = None  # None (no call of ours running), OFF, or a CallState
        self._strength = strength
        self._adapters_for = adapters_for  # (device, dtype) -> the patch's prepared adapters there
        self._warn_once = warn_once
        self._threads = cpu_adapter_threads()  # decided once per run, not per layer call
        self._handles = []
        try:
            for path, entries in modules.items():
                module = diffusion_model.get_submodule(path)
                hook = self._hook(entries, conv_geometry(module, path))
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, entries, conv: Optional[dict]):
        add = self._add if conv is None else functools.partial(self._add_conv, conv=conv)

        def hook(module, args, kwargs, output):
            state = self.state
            if state is None:
                self._warn_once("outside", "the diffusion model ran outside a sampler call (no sigma known): "
                                "the T-LoRA adds nothing to it")
                return None
            if state is OFF or state.merged:
                return None
            x = args[0] if args else kwargs["input"]
            threads = self._threads if x.device.type == "cpu" else None
            if threads is None:
                add(entries, state, x, output)
                return None
            saved = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                add(entries, state, x, output)
            finally:
                torch.set_num_threads(saved)
            return None

        return hook

    def _add(self, entries, state: CallState, x: torch.Tensor, output: torch.Tensor) -> None:
        prepared = self._adapters_for(x.device, x.dtype)
        strength, active = self._strength, state.uniform
        if active is not None and output.dtype == x.dtype and output.is_contiguous():
            # the usual call (one noise level for the whole cond/uncond batch)
            x2 = x.reshape(-1, x.shape[-1])
            o2 = output.view(-1, output.shape[-1])
            for e in entries:
                ad = e.adapter
                rt.add_prefix_2d_(o2, x2, prepared[e.index], active[ad.rank] * ad.group, strength, e.out_slice)
            return
        for e in entries:
            p, ad = prepared[e.index], e.adapter
            if active is not None:
                rt.add_lowrank_(output, x, p.down, p.up, active[ad.rank] * ad.group, strength, e.out_slice)
            else:
                mask = state.mask(ad.rank, ad.group, x.device, x.dtype)
                rt.add_lowrank_per_sample_(output, x, p.down, p.up, mask, strength, e.out_slice)

    def _add_conv(self, entries, state: CallState, x: torch.Tensor, output: torch.Tensor, conv: dict) -> None:
        prepared = self._adapters_for(x.device, x.dtype)
        active = state.uniform
        for e in entries:
            p, ad = prepared[e.index], e.adapter
            if active is not None:
                rt.add_lowrank_conv_(output, x, p.down, p.up, active[ad.rank] * ad.group, self._strength, conv)
            else:
                mask = state.mask(ad.rank, ad.group, x.device, x.dtype)
                rt.add_lowrank_conv_(output, x, p.down, p.up, mask.shape[1], self._strength, conv, mask)


def conv_geometry(module, path: str) -> Optional[dict]:
    """A 2-D convolution's kernel size, stride, padding and dilation (what its adapter's down
    convolution takes, as the trainers build it); None for a linear layer."""
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"T-LoRA: layer {path} is a grouped convolution: not supported")
        return {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation}
    weight = getattr(module, "weight", None)
    if weight is not None and weight.ndim != 2:
        raise ValueError(f"T-LoRA: layer {path} ({type(module).__name__}) is neither linear nor a 2-D convolution")
    return None
