"""Chebyshev-filtered subspace iteration on the float64 Gram matrix: the GPU's method for large layers.

A GPU runs float64 products with the Gram matrix fast while its full ``eigh`` is latency-bound:
a few dozen products and one small ``eigh`` per filter beat the dense method there.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import accuracy, products, settings

# at most this many filters (then dense); each filter's degree is what the worst boundary still
# needs (``filter_degree``), capped so that the block's top direction cannot outgrow its k-th by
# more than FILTER_SPREAD (its k-th must survive the next orthonormalisation)
MAX_FILTERS = 8
FILTER_MAX_DEGREE = 40
FILTER_SPREAD = 1e8
STALLED = 0.5  # a filter that leaves the worst bound above this share of what it was: give up


def top_triplets(weight, k, device, seed):
    """Top-k singular triplets by Chebyshev-filtered subspace iteration on G = A^T A in float64, or
    None where it does not converge (the caller then goes dense).

    A block X of b ~ 2k orthonormal rows; each round is a Rayleigh-Ritz step (X G X^T, one b x b
    ``eigh``), the per-boundary bounds of ``accuracy.error_bound`` from its residuals, and where
    they miss their targets a filter T_d((2G - c) / c) with c the block's smallest Ritz value: it
    damps every direction below c (those outside the block) against the wanted ones above it by
    1 / T_d(x_k), x_k = 2 theta_k / c - 1 (Zhou & Saad's ChFSI). Random (Marchenko-Pastur) layers
    of width 3072 take ~4 rounds and 40-50 products with G; decaying spectra 3 rounds and ~8. The
    Ritz vectors are then certified against A itself (``accuracy.certify``).
    """
    A, transposed = products.oriented(weight, device)
    N = A.shape[1]
    G = products.gram(A, torch.float64)
    b = min(N, max(2 * k, k + 64))
    gen = torch.Generator(G.device).manual_seed(seed)
    X = products.orthonormal_rows(torch.randn(b, N, generator=gen, dtype=torch.float64, device=G.device))[0]
    worst_before = math.inf
    for left in range(MAX_FILTERS, -1, -1):
        GX = X @ G  # rows of (G X^T)^T: G is symmetric
        H = (GX @ X.t()).cpu()
        with settings.one_thread():
            theta, Z = torch.linalg.eigh((H + H.t()) / 2)
        theta, Zt = theta.flip(0), Z.flip(1).t().contiguous().to(G.device)
        X, GX = Zt @ X, Zt @ GX  # the Ritz vectors, descending
        sv = theta.clamp_min(0).sqrt()
        gram_res = (GX[:k] - theta[:k, None].to(G.device) * X[:k]).norm(dim=1).cpu()
        est = accuracy.error_bound(gram_res / sv[:k].clamp_min(1e-300), sv[:k], float(sv[-1]))[: k - 1]
        worst = float((est / accuracy.targets(sv[:k], k)).max()) if k > 1 else 0.0
        if worst <= 1.0:
            break
        if worst > STALLED * worst_before:
            return None  # the last filter did not work: not this method's case
        filt = filter_degree(theta, k, worst)
        if filt is None or filt[1] * left < math.log(worst):
            return None  # too slow to finish in the filters left (steep spectra: the cap on the degree)
        worst_before, degree = worst, filt[0]
        X = products.orthonormal_rows(chebyshev(G, X, GX, degree, float(theta[-1])))[0]
    del G, GX
    return accuracy.certify(A, transposed, X, k)  # the whole block: its smallest Ritz value bounds what is outside


def filter_degree(theta: torch.Tensor, k: int, worst: float) -> Optional[tuple[int, float]]:
    """``(degree, log_gain)`` of the next Chebyshev filter: the degree that shrinks the worst bound
    (``worst`` x its target) ~10x more than needed, capped so that the block's top direction does
    not outgrow its k-th by more than FILTER_SPREAD; ``log_gain`` = log T_degree(x_k), what it
    shrinks the k-th direction's error by (in logs: T_d overflows a float for a tiny cut). None
    where the k-th Ritz value is not above the cut."""
    cut = float(theta[-1])
    if not (cut > 0 and float(theta[k - 1]) > cut):
        return None
    a_k = math.acosh(2 * float(theta[k - 1]) / cut - 1)
    a_1 = math.acosh(2 * float(theta[0]) / cut - 1)
    need = math.ceil(math.log(10 * worst) / a_k)
    spread = int(math.log(FILTER_SPREAD) / max(a_1 - a_k, 1e-12))
    degree = max(2, min(need, spread, FILTER_MAX_DEGREE))
    x = degree * a_k
    return degree, x + math.log1p(math.exp(-2 * x)) - math.log(2)  # log cosh x


def chebyshev(G: torch.Tensor, X: torch.Tensor, GX: torch.Tensor, degree: int, cut: float) -> torch.Tensor:
    """Rows of T_degree((2G - cut I) / cut) X^T by the three-term recurrence (``GX`` = X G given)."""
    c = cut / 2
    prev, cur = X, (GX - c * X) / c
    for _ in range(degree - 1):
        nxt = cur @ G
        nxt.sub_(cur, alpha=c).mul_(2 / c).sub_(prev)
        prev, cur = cur, nxt
    return cur
