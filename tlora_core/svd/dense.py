"""The dense methods: the float64 Gram matrix of the smaller side and ``eigh`` (exact to float64;
the choice for small layers and the fallback of the iterative ones), and a float64 full SVD for
lycoris' ``last`` / ``middle`` choices, which need the whole spectrum."""

from __future__ import annotations

import contextlib

import torch

from . import products, settings

# a CPU multiplies out the Gram matrix of a layer up to this width on one thread (as it does the
# small LAPACK calls, ``settings.one_thread``): wider ones, such as a fallback of the iterative
# methods, are worth all threads; the ``eigh`` runs on one thread at any width
ONE_THREAD_MAX = 1536


def top_triplets(weight, k, device):
    """Top-k ``(P, s, Q)`` of ``weight``: float64 A^T A, its full ``eigh``, U = A V / s."""
    A, transposed = products.oriented(weight, device)
    cpu = A.device.type == "cpu"
    with settings.one_thread() if cpu and A.shape[1] <= ONE_THREAD_MAX else contextlib.nullcontext():
        G = products.gram(A, torch.float64)
        with settings.one_thread() if cpu else contextlib.nullcontext():
            evals, evecs = torch.linalg.eigh(G)
        evals = evals.flip(0)[:k].clamp_min(0)
        V = evecs.flip(1)[:, :k].contiguous()
        del G, evecs
        return products.finish(A, transposed, V, evals.sqrt())


def sig_type_triplets(weight, r, sig_type, device):
    """The r triplets that lycoris' ``sig_type`` ``last`` / ``middle`` chooses, from a float64 full SVD."""
    w = weight.to(device) if device is not None else weight
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    idx = _select(sig_type, s.numel(), r)
    return u[:, idx], s[idx], vh[idx]


def _select(sig_type: str, n: int, r: int) -> list[int]:
    """lycoris' ``sig_type`` choice of r singular triplets out of n."""
    if sig_type == "last":
        return list(range(n - r, n))
    if sig_type == "middle":
        start = (n - r) // 2
        return list(range(start, start + r))
    raise ValueError(f"unknown sig_type {sig_type!r} (principal, last, middle)")
