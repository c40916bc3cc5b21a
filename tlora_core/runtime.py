"""Host-free runtime maths: add a prefix-masked low-rank adapter to a layer's output, in place.

The adapter acts at the output (``y += s * U[:, :k] (D[:k] x)``) rather than on the weight, so it
works whatever the base weight is stored as (fp8, GGUF, offloaded) and never touches it. Only the
active ranks are computed (``k = active_rank * group``: a slice, never a multiplication by zeros),
and the result is accumulated straight into the output (or into its slice of a fused qkv /
linear1 output) with ``addmm_``: no zero buffers, no output-sized temporaries.

The down projection is taken as ``D[:k] x^T`` (k x rows), the layout ``addmm_`` then reads as a
transposed operand for free: for the thin shapes here (k < 64, a few hundred rows) MKL runs it
faster than ``x D[:k]^T``, whose speed jumps with k (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _target_2d(out: torch.Tensor, out_slice: Optional[tuple[int, int]]) -> Optional[torch.Tensor]:
    """A 2-D (rows, features) view of ``out`` (or of its feature slice), or None if no view exists."""
    if not out.is_contiguous():
        return None
    o2 = out.view(-1, out.shape[-1])
    if out_slice is not None:
        off, size = out_slice
        o2 = o2[:, off:off + size]
    return o2


def add_lowrank_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, k: int,
                 strength: float, out_slice: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``out[..., slice] += strength * (x @ down[:k].T) @ up[:, :k].T`` in place; returns ``out``.

    ``x`` is the layer input (..., in), ``out`` its output (..., out_features); ``down`` (K, in) and
    ``up`` (size, K) are the adapter in the activation dtype/device.
    """
    if k <= 0:
        return out
    x2 = x.reshape(-1, x.shape[-1])
    h = torch.mm(down[:k], x2.t()).t()  # (rows, k), computed as D[:k] x^T (see the module docstring)
    up_t = up[:, :k].t()
    o2 = _target_2d(out, out_slice)
    if o2 is not None and h.dtype == o2.dtype:
        o2.addmm_(h, up_t, alpha=strength)
    else:  # unusual layouts / mixed dtypes: one temporary, still exact
        delta = torch.mm(h, up_t).reshape(*out.shape[:-1], -1).to(out.dtype)
        target = out if out_slice is None else out.narrow(-1, out_slice[0], out_slice[1])
        target.add_(delta, alpha=strength)
    return out


def _rows_mask(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """The (B, k) per-sample ``mask`` for a layer batch of ``rows`` (a multiple of B: models that fold
    frames or patches into the batch keep each sample's rows together)."""
    B = mask.shape[0]
    if rows % B:
        raise RuntimeError(f"T-LoRA: a layer's batch ({rows}) is not a multiple of the call's batch ({B}); "
                           "cannot place per-sample rank masks")
    return mask.repeat_interleave(rows // B, dim=0) if rows > B else mask


def add_lowrank_per_sample_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                            mask: torch.Tensor, strength: float,
                            out_slice: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Like ``add_lowrank_`` with one prefix mask per batch element.

    ``mask`` is (B, k_max) in the activation dtype (1 for active columns, 0 else), k_max being the
    largest active column count of the call; ``x.shape[0]`` must be a multiple of B (models that
    fold frames or patches into the batch keep each sample's rows together).
    """
    kmax = mask.shape[1]
    if kmax <= 0:
        return out
    m = _rows_mask(mask, x.shape[0])
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    h = torch.matmul(x3, down[:kmax].t())
    h.mul_(m.unsqueeze(1))
    delta = torch.matmul(h, up[:, :kmax].t()).reshape(*out.shape[:-1], -1).to(out.dtype)
    target = out if out_slice is None else out.narrow(-1, out_slice[0], out_slice[1])
    target.add_(delta, alpha=strength)
    return out


def add_lowrank_conv_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, k: int,
                      strength: float, conv: dict, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 2-D convolution's adapter at its output, in place: ``out += strength * up[:, :k] conv(x, D[:k])``.

    ``down`` holds the flattened kernels (K, in * kh * kw) of a convolution with the layer's own
    geometry (``conv``: ``kernel_size``, ``stride``, ``padding``, ``dilation``), zero-padded as the
    trainers' ``lora_down`` convs are; ``up`` (out, K) is a 1x1 convolution. ``mask`` (B, k) switches
    columns per batch element (``k`` = its width), as in ``add_lowrank_per_sample_``.
    """
    if k <= 0:
        return out
    kernels = down[:k].reshape(k, x.shape[1], *conv["kernel_size"])
    h = F.conv2d(x, kernels, None, conv["stride"], conv["padding"], conv["dilation"])
    if mask is not None:
        h.mul_(_rows_mask(mask, h.shape[0])[:, :, None, None])
    delta = F.conv2d(h, up[:, :k, None, None])
    out.add_(delta if delta.dtype == out.dtype else delta.to(out.dtype), alpha=strength)
    return out


class Prepared:
    """One adapter in the activation dtype/device, with its active-rank views cached per ``k``.

    Views cost no memory; caching them keeps the per-call work to the two matmuls.
    """

    __slots__ = ("down", "up", "_views")

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down, self.up, self._views = down, up, {}

    def views(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down[:k], up[:, :k].T)``."""
        v = self._views.get(k)
        if v is None:
            v = self._views[k] = (self.down[:k], self.up[:, :k].t())
        return v


def add_prefix_2d_(o2: torch.Tensor, x2: torch.Tensor, prepared: Prepared, k: int, strength: float,
                   out_slice: Optional[tuple[int, int]] = None) -> None:
    """Fast path of ``add_lowrank_`` for 2-D ``x2`` (rows, in) and a 2-D view ``o2`` (rows, out) of a
    contiguous output in the same dtype: two BLAS calls, the second accumulating in place."""
    if k <= 0:
        return
    d_k, u_t = prepared.views(k)
    h_t = torch.mm(d_k, x2.t())
    if out_slice is not None:
        o2 = o2[:, out_slice[0]:out_slice[0] + out_slice[1]]
    o2.addmm_(h_t.t(), u_t, alpha=strength)


def merge_prefix_(weight: torch.Tensor, base: torch.Tensor, prepared: Prepared, k: int, strength: float,
                  carried: int = 0) -> None:
    """Make ``weight`` carry ``base + strength * up[:, :k] @ down[:k]``, in place: a layer's weight
    with its active ranks, ``base`` an untouched copy of it, ``carried`` the ranks it carries now.

    A growing rank (the usual case: masks only grow as the noise falls) adds just the new ranks,
    ``weight += strength * up[:, carried:k] @ down[carried:k]``: one read and write of the weight
    and the new ranks' FLOPs, where recomputing from ``base`` reads it too and multiplies all k
    (about half the time on a GPU: benchmarks/RESULTS.md). An fp32 weight then holds the rounding of a few sums (~1e-7 relative each). In fp16 / bf16 each sum
    would round at the weight's own precision (bf16: 2^-9), so those, and a shrinking rank, are
    always recomputed from ``base``: one rounding, as ComfyUI's own LoRA merge. ``prepared`` is in
    the weight's dtype and device.
    """
    if k == carried:
        return
    if k > carried > 0 and weight.dtype == torch.float32:
        weight.addmm_(prepared.up[:, carried:k], prepared.down[carried:k], alpha=strength)
        return
    if k <= 0:
        weight.copy_(base)
        return
    d_k, u_t = prepared.views(k)
    torch.addmm(base, u_t.t(), d_k, alpha=strength, out=weight)


def merge_sum_(weight: torch.Tensor, base: torch.Tensor, parts: Sequence, strength: float) -> None:
    """Make ``weight`` carry ``base + strength * sum(up[:, :k] @ down[:k])`` over ``parts`` =
    ``(prepared, k, out_rows)`` (rows ``(offset, size)`` of the weight that adapter adds to, None:
    all): adapters overlapping on one weight, summed in fp32 and rounded once into ``weight``."""
    acc = base.float() if base.dtype != torch.float32 else base.clone()
    for prepared, k, rows in parts:
        if k <= 0:
            continue
        d_k, u_t = prepared.views(k)
        target = acc if rows is None else acc.narrow(0, rows[0], rows[1])
        target.addmm_(u_t.t().float(), d_k.float(), alpha=strength)
    weight.copy_(acc)


def prefix_mask(ranks: Sequence[int], group: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(B, max(ranks) * group) binary mask: the first ``rank * group`` columns of each row on."""
    kmax = max(ranks) * group
    k = torch.tensor([r * group for r in ranks], device=device).unsqueeze(1)
    return (torch.arange(kmax, device=device).unsqueeze(0) < k).to(dtype)
