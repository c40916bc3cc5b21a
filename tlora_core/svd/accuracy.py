"""How exact the base terms are, and must be.

- The trainer's side: lycoris-lora took a backward-stable fp32 SVD, which reproduces the rank-k
  product only to ``predicted_fp32_error`` at boundary k; where that exceeds REPRODUCIBLE_TOL, no
  method can match the trainer's result (``ill_conditioned_boundaries``).
- Ours: the iterative methods stop when every boundary's a-posteriori bound (``error_bound``) is
  below its target (``targets``), and their result is certified by a float64 Rayleigh-Ritz step
  against the weight itself, with true residuals (``certify``).
"""

from __future__ import annotations

import math

import torch

from . import products, settings

EPS32 = float(torch.finfo(torch.float32).eps)
# Products at a mask boundary are compared with the trainer's fp32 SVD to this relative error.
REPRODUCIBLE_TOL = 1e-5
FP32_SVD_C = 8.0  # see predicted_fp32_error (measured up to ~6)
FP32_SVD_FLOOR = 2e-6  # rounding of the fp32 factors themselves (measured <= 1.5e-6)
# the iterative methods stop when every boundary's a-posteriori bound is below this, or below a
# quarter of the trainer's own fp32 rounding there (``targets``)
TARGET = 1e-6


def predicted_fp32_error(s: torch.Tensor, k: int) -> float:
    """Expected relative error of the rank-k product of a backward-stable fp32 SVD (the trainer's).

    Its error in W is ~eps32 * s_1; that turns directions k and k+1 into each other by an angle
    ~eps32 * s_1 / (s_k - s_{k+1}) (Wedin), changing the rank-k product by ~that angle * s_k;
    relative to |W_k|_F. The constants were measured against float64 SVDs (random and separated
    spectra, n = 64..3072): the error stayed below FP32_SVD_FLOOR + ~6 x the bound; 8 is used.
    """
    s = s.double().cpu()
    s1, sk = float(s[0]), float(s[k - 1])
    nxt = float(s[k]) if k < s.numel() else 0.0
    gap = sk - nxt
    if s1 == 0.0:
        return 0.0
    if gap <= 0:
        return math.inf
    norm_k = float(s[:k].norm())
    return FP32_SVD_FLOOR + FP32_SVD_C * EPS32 * s1 * sk / (gap * norm_k)


def predicted_fp32_errors(s: torch.Tensor, n: int) -> torch.Tensor:
    """``predicted_fp32_error(s, k)`` for k = 1..n at once (float64, CPU): the iterations check
    every boundary each round, and the per-boundary loop's scalar reads would cost more than the
    check itself."""
    s = s.double().cpu()
    n = min(n, s.numel())
    if n == 0 or float(s[0]) == 0.0:
        return torch.zeros(n, dtype=torch.float64)
    sk = s[:n]
    nxt = torch.cat([s[1:n + 1], s.new_zeros(max(0, n + 1 - s.numel()))])[:n]
    gap = sk - nxt
    norms = torch.sqrt(torch.cumsum(sk * sk, 0))
    err = FP32_SVD_FLOOR + FP32_SVD_C * EPS32 * s[0] * sk / (gap * norms)
    return torch.where(gap > 0, err, torch.full_like(err, math.inf))


def ill_conditioned_boundaries(s: torch.Tensor, rank: int, tol: float = REPRODUCIBLE_TOL,
                               own_error=0.0) -> list[int]:
    """Boundaries k in 1..rank where the top-k product of an fp32 SVD is not reproducible to ``tol``.

    ``s`` holds the singular values s_1..s_{rank+1} (descending; fewer when the matrix is smaller).
    A boundary is flagged when the trainer's own expected error (``predicted_fp32_error``) plus
    ours (``own_error``: one bound, or one per boundary) exceeds ``tol``: there no method can match
    the trainer's result to ``tol``.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return []
    n = min(rank, s.numel())
    own = list(own_error) if isinstance(own_error, (list, tuple)) else [own_error] * n
    trainer = predicted_fp32_errors(s, n).tolist()
    return [k for k in range(1, n + 1) if trainer[k - 1] + own[k - 1] > tol]


def targets(s: torch.Tensor, k: int) -> torch.Tensor:
    """How exact boundary j must be: TARGET, or a quarter of the trainer's own fp32 rounding there
    (``predicted_fp32_error``) when that is larger: added in quadrature, it then changes the
    achievable agreement with the trainer by < 3%."""
    return (0.25 * predicted_fp32_errors(s, k - 1)).clamp_min(TARGET)


def error_bound(res: torch.Tensor, s: torch.Tensor, last: float) -> torch.Tensor:
    """Per boundary j = 1..k: a bound on the relative error of the rank-j product.

    With u_i = A v_i / s_i, the residual ``res[i]`` = |A^T u_i - s_i v_i| is 1/s_i times v_i's
    eigen-residual for A^T A, and is orthogonal to the block: it turns v_i towards directions
    outside it (singular values <= ``last``, the block's smallest Ritz value) by at most
    s_i res_i / (s_i^2 - last^2) (Davis-Kahan; half of res_i / (s_i - last) near the top of a
    random spectrum). Turning v_i by an angle towards a direction of singular value <= last
    moves A v_i v_i^T by at most sqrt(s_i^2 + last^2) times the angle. Measured against float64
    SVDs (random, tall, wide and decaying spectra): the true error stays at 0.2-1.0x the bound.
    """
    gaps = (s * s - last * last).clamp_min(0)
    dev = torch.where(gaps > 0, res * s * torch.sqrt(s * s + last * last) / gaps, torch.full_like(res, math.inf))
    norms = torch.sqrt(torch.cumsum(s * s, 0)).clamp_min(1e-300)
    return (torch.sqrt(torch.cumsum(dev * dev, 0)) / norms).cpu()


def certify(A, transposed, Q, k, refine_max: int = 6):
    """Rayleigh-Ritz against A in float64 on the rows ``Q`` (k wanted + a few more Ritz vectors),
    and the error of every boundary from the float64 residuals ``A^T u_i - s_i v_i``
    (``error_bound``); float64 subspace steps while that misses the targets (fp32 products
    resolve a direction only to ~eps32 s_1^2 / (s_i^2 - s_(i+1)^2): steep spectra).

    Returns ``(P, s, Q, est)`` of the weight's own orientation (``transposed``: A = W^T), with
    ``est`` the bound of boundaries 1..k-1."""
    Q = products.orthonormal_rows(Q.double())[0]  # the fp32 basis is orthonormal only to ~1e-7: exact first
    for step in range(refine_max + 1):
        QAt, QG = products.times_both_rows(A, Q)
        with settings.one_thread():  # Q A^T = Vz S U^T, with Vz from the small Q A^T A Q^T = Vz S^2 Vz^T
            S2, Vz = torch.linalg.eigh((QG @ Q.t() + Q @ QG.t()) / 2)
        Vzk = Vz.flip(1)[:, :k]
        SUt = Vzk.t() @ QAt
        s = SUt.norm(dim=1)  # |A v_i|: exact even where s^2 drowns in float64 rounding
        inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        U = SUt * inv[:, None]  # left singular vectors, as rows
        V = Vzk.t() @ Q  # right singular vectors, as rows
        last = math.sqrt(max(float(S2[0]), 0.0)) if S2.numel() > k else 0.0
        ATU = (Vzk.t() @ QG) * inv[:, None]  # rows of (A^T U)^T = S^-1 Vz^T Q A^T A
        est = error_bound((ATU - V * s[:, None]).norm(dim=1), s, last)[: k - 1]
        if bool((est <= targets(s.cpu(), k)).all()) or step == refine_max:
            break
        Q = products.orthonormal_rows(QG)[0]
    if transposed:  # A = W^T: W = V^T S U
        return V.t(), s, U, est
    return U.t(), s, V, est
