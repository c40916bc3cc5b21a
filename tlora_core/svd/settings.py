"""Process-wide thread and TF32 settings, each changed only inside a ``with`` block."""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def one_thread():
    """Small LAPACK calls (eigh of a k x k matrix, QR/Cholesky of a tall block) on one thread: with
    more, OpenMP synchronisation costs many times their work on a busy CPU."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def ieee_fp32():
    """Full-precision fp32 matmuls on GPUs while computing (TF32 would cost 3 digits)."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def scipy_blas_one_thread():
    """SciPy's own BLAS (OpenBLAS) on one thread. Its idle workers spin for a while after every
    call, taking a core from torch's: on a small CPU every product of the Lanczos loop that
    follows a SciPy call would run slower."""
    try:
        controller = _blas_controller()
    except ImportError:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


@functools.lru_cache(maxsize=None)
def _blas_controller():
    """One threadpoolctl controller, made after SciPy is loaded: a fresh ``threadpool_limits``
    scans every loaded library each time, which in a ComfyUI process (many libraries) costs far
    more than the cached controller's limit."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
