"""Lanczos' product ``X -> X A^T A`` on a CPU, through oneDNN's private ops where they are exact.

``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise`` are not public API: they are
used only where a check against float64 shows this build has them and computes in full fp32
(``onednn_is_fp32``), and plain BLAS products are the fallback everywhere else.
"""

from __future__ import annotations

import functools
import platform

import torch


def times_ata(A: torch.Tensor, b: int, copy_ok: bool):
    """``X -> X A^T A`` for blocks of ``b`` rows X: Lanczos' product without the Gram matrix.

    On an x86-64 CPU through oneDNN with A and A^T reordered for b-row inputs
    (``onednn_times_ata``; measured there only: other CPUs keep their BLAS); elsewhere A^T is one
    row-major copy (when A needed none, ``copy_ok``): faster than a product with a transposed
    operand at these thin shapes.
    """
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    packed = onednn_times_ata(A, b) if A.device.type == "cpu" and x86 else None
    if packed is not None:
        return packed
    At = A.t().contiguous() if copy_ok else A.t()
    return lambda X: (At @ (A @ X.t())).t().contiguous()


def onednn_times_ata(A: torch.Tensor, b: int):
    """``X -> X A^T A`` through oneDNN's linear with A and A^T reordered once into its blocked
    layout for b-row inputs (two copies of A), or None where this build lacks that or does not
    compute it in full fp32 (``onednn_is_fp32``).

    MKL's thin sgemm runs far below the memory bandwidth at b = 16; the reordered products are
    markedly faster, and the two one-off reorders cost about what twenty blocks save.
    """
    if not onednn_is_fp32(_onednn_fp32_math()):
        return None
    ops = torch.ops.mkldnn
    try:
        wa, wat = ops._reorder_linear_weight(A, b), ops._reorder_linear_weight(A.t(), b)
    except RuntimeError:  # a layout this build refuses
        return None
    return lambda X: ops._linear_pointwise(ops._linear_pointwise(X, wa, None, "none", [], ""),
                                           wat, None, "none", [], "")


def _onednn_fp32_math() -> str:
    """oneDNN's fp32 math setting where this torch has one (bf16 / tf32 change what it computes)."""
    return str(getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None))


@functools.lru_cache(maxsize=None)
def onednn_is_fp32(math_setting: str) -> bool:
    """Whether oneDNN's linear with reordered weights (of a matrix and of a transposed view) exists
    here and computes x @ w.T in full fp32: checked against float64 on small products, once per
    math setting. (Exactness never rests on it: the float64 certification would catch a wrong
    product; this keeps a slow, stalling Lanczos from being chosen.)"""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    w, x, y = torch.randn(96, 256, generator=g), torch.randn(16, 256, generator=g), torch.randn(16, 96, generator=g)
    try:
        ops = torch.ops.mkldnn
        got = [ops._linear_pointwise(x, ops._reorder_linear_weight(w, 16), None, "none", [], ""),
               ops._linear_pointwise(y, ops._reorder_linear_weight(w.t(), 16), None, "none", [], "")]
    except (AttributeError, RuntimeError, TypeError):  # an op missing from, or refused by, this build
        return False
    want = [x.double() @ w.double().t(), y.double() @ w.double()]
    return all(float((a.double() - e).norm() / e.norm()) <= 1e-6 for a, e in zip(got, want))
