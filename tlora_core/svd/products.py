"""Products with the weight, streamed by rows, and the orthonormalisation of thin blocks.

Every method works on ``A`` = W or W^T, whichever is tall (``oriented``), so that A^T A is the
small Gram matrix. A weight in another dtype than the product's is converted a chunk of rows at
a time (``row_chunks``): no full-size converted copy of W.
"""

from __future__ import annotations

import torch

from . import settings

CHUNK_ELEMS = 1 << 21  # elements per chunk when streaming W (keeps converted copies small)
ONE_PASS_MAX_KAPPA = 1e4  # ``orthonormal_rows``: eps64 * 1e4 ~ 2e-12, far below eps32


def oriented(weight: torch.Tensor, device):
    """``A`` = W or W^T so that A is tall (M >= N): the Gram matrix A^T A is the small one."""
    A = weight if weight.shape[0] >= weight.shape[1] else weight.t()
    if device is not None and A.device != device:
        A = A.to(device)
    return A, weight.shape[0] < weight.shape[1]


def row_chunks(A: torch.Tensor, dtype):
    """``(rows, A[rows] in dtype)`` for consecutive row slices of A: A itself when no conversion is
    needed, else chunks converted into one reused buffer (no full-size copy, no fresh pages per
    chunk: a new multi-MB CPU allocation costs more in page faults than its conversion)."""
    M, N = A.shape
    if A.dtype == dtype:
        yield slice(0, M), A
        return
    step = max(1, CHUNK_ELEMS // max(N, 1))
    # A = W^T (a wide weight) is read in W's own layout, a block of W's columns at a time, and the
    # chunk handed on transposed: gathering A's rows would transpose element by element (far slower)
    by_columns = A.stride(0) == 1 and A.stride(1) != 1
    buf = torch.empty((N, min(step, M)) if by_columns else (min(step, M), N), dtype=dtype, device=A.device)
    for i in range(0, M, step):
        rows = slice(i, min(M, i + step))
        if by_columns:
            chunk = buf[:, : rows.stop - rows.start]
            chunk.copy_(A[rows].t())
            yield rows, chunk.t()
        else:
            chunk = buf[: rows.stop - rows.start]
            chunk.copy_(A[rows])
            yield rows, chunk


def gram(A: torch.Tensor, dtype) -> torch.Tensor:
    """A^T A in ``dtype``, streaming A by rows (no full-size converted copy of W).

    Only the upper block triangle is multiplied (then mirrored): ~56% of a full product.
    """
    M, N = A.shape
    G = torch.zeros(N, N, dtype=dtype, device=A.device)
    nb = max(1, min(8, N // 256))
    edges = [round(i * N / nb) for i in range(nb + 1)]
    for _, Ac in row_chunks(A, dtype):
        for j in range(nb):
            j0, j1 = edges[j], edges[j + 1]
            G[:j1, j0:j1].addmm_(Ac[:, :j1].t(), Ac[:, j0:j1])
    for j in range(nb):  # mirror the strictly-lower blocks from the upper ones
        j0, j1 = edges[j], edges[j + 1]
        G[j1:, j0:j1] = G[j0:j1, j1:].t()
    return G


def _times(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A @ X with A's rows converted chunk by chunk to X's dtype."""
    out = torch.empty(A.shape[0], X.shape[1], dtype=X.dtype, device=X.device)
    for rows, Ac in row_chunks(A, X.dtype):
        torch.mm(Ac, X, out=out[rows])
    return out


def times_both_rows(A: torch.Tensor, Q: torch.Tensor):
    """``(Q A^T, Q A^T A)`` for the rows ``Q`` (m, N), in Q's dtype, from one streamed pass over A's
    rows. (Products in this orientation run faster than ``A @ Q^T`` at these shapes.)"""
    M, N = A.shape
    QAt = torch.empty(Q.shape[0], M, dtype=Q.dtype, device=Q.device)
    QG = torch.zeros(Q.shape[0], N, dtype=Q.dtype, device=Q.device)
    for rows, Ac in row_chunks(A, Q.dtype):
        QAt[:, rows] = Q @ Ac.t()
        QG.addmm_(QAt[:, rows], Ac)
    return QAt, QG


def finish(A, transposed, V, s):
    """Left vectors U = A V / s in float64; returns (P, s, Q) of the original orientation."""
    U = _times(A, V)
    nz = s > 0
    U[:, nz] /= s[nz]
    U[:, ~nz] = 0  # zero singular values: the product is zero whatever the vectors
    if transposed:  # A = W^T: W = V s U^T
        return V, s, U.t()
    return U, s, V.t()


def orthonormal_rows(X: torch.Tensor):
    """Cholesky-QR in float64 on the rows of the short, wide ``X`` (b, N): ``X = R^T Q`` with
    orthonormal rows ``Q`` (X's dtype) and upper-triangular ``R`` (float64). BLAS-3 and cheap;
    Householder QR where Cholesky breaks down. Twice, except for a well-conditioned fp32 ``X``
    (kappa(X X^T) <= ONE_PASS_MAX_KAPPA, as Lanczos blocks of flat spectra are): one pass then
    leaves an error ~eps64 * kappa, far below the rounding of Q to fp32."""
    with settings.one_thread():
        Xd, R, passes = X.double(), None, 2
        for i in range(2):
            G = Xd @ Xd.t()
            if i == 0 and X.dtype == torch.float32:
                ev = torch.linalg.eigvalsh(G)
                passes = 1 if 0 < float(ev[-1]) <= ONE_PASS_MAX_KAPPA * float(ev[0]) else 2
            L, info = torch.linalg.cholesky_ex(G)
            if int(info) != 0:
                Qc, Ri = torch.linalg.qr(Xd.t())
                Xd = Qc.t()
            else:
                Ri = L.t()
                Xd = torch.linalg.solve_triangular(L, Xd, upper=False)
            R = Ri if R is None else Ri @ R
            if i + 1 == passes:
                break
        return Xd.to(X.dtype), R
