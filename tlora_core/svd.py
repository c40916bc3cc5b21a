"""The top singular triplets of a base weight: LyCORIS ``tlora``'s frozen base terms, rebuilt fast.

LyCORIS files do not store their base terms ``P0 diag(lambda0) Q0``: they are the top-r singular
triplets of the adapted base weight W (fp32, ``sig_type="principal"``), which lycoris-lora took
with a full ``torch.linalg.svd``. A full SVD of every layer is the slow part of loading such a file
(seconds to a minute per layer at real width), and only r (<= 128 or so) of its thousands of
triplets are used. Here only those are computed:

- ``dense``: the Gram matrix of the smaller side in float64 and ``eigh``; exact to float64 and the
  fastest for small layers (tests, tiny models).
- ``iterative``: Chebyshev-filtered subspace iteration on the fp32 Gram matrix (BLAS-3 products of
  an n x k block, k ~ 2r), then a Rayleigh-Ritz step against W itself in float64. It stops on the
  residuals, so it adapts to the spectrum: a random (Marchenko-Pastur) layer, the hardest case,
  takes ~20 block products. Its error in the products is ~1e-6 relative, far below the rounding
  of the trainer's own fp32 SVD.

Only products are defined, not the signs of singular vectors; and where two singular values at a
mask boundary nearly coincide, the split between "active" and "inactive" base ranks is defined
only up to the trainer's fp32 rounding: ``BaseTerms.ill_conditioned`` lists those boundaries
(see ``ill_conditioned_boundaries``), for every method alike.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

EPS32 = float(torch.finfo(torch.float32).eps)
# Products at a mask boundary are compared with the trainer's fp32 SVD to this relative error.
REPRODUCIBLE_TOL = 1e-5
FP32_SVD_C = 8.0  # see predicted_fp32_error (measured up to ~6)
FP32_SVD_FLOOR = 2e-6  # rounding of the fp32 factors themselves (measured <= 1.5e-6)
OWN_ERROR = {"dense": 3e-7, "iterative": 3e-6}  # measured vs float64 SVDs (products of the fp32 output)
# a-posteriori bound above which the dense float64 method is used instead (below it, the bound is
# added to the trainer's own error when flagging boundaries)
ITERATIVE_MAX_ERROR = 1e-5
DENSE_MAX = 768  # smaller side at or below this: dense float64 (fast enough, exact)
_CHUNK_ELEMS = 1 << 23  # rows per chunk when streaming W (keeps the extra memory ~ one Gram matrix)


@dataclass
class BaseTerms:
    """``P0 (out, r)``, ``lambda0 (r,)``, ``Q0 (r, in)`` in float32, as lycoris-lora stores them."""

    p: torch.Tensor
    lam: torch.Tensor
    q: torch.Tensor
    # mask boundaries k (k ranks active) where s_k and s_{k+1} nearly coincide: the trainer's own
    # fp32 SVD reproduces the base term there only to ~ eps32 * s_1 / (s_k - s_{k+1})
    ill_conditioned: list = field(default_factory=list)
    est_error: float = 0.0  # a-posteriori bound on this computation's own error in the products (iterative)
    method: str = ""


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


def ill_conditioned_boundaries(s: torch.Tensor, rank: int, tol: float = REPRODUCIBLE_TOL,
                               own_error: float = 0.0) -> list[int]:
    """Boundaries k in 1..rank where the top-k product of an fp32 SVD is not reproducible to ``tol``.

    ``s`` holds the singular values s_1..s_{rank+1} (descending; fewer when the matrix is smaller).
    A boundary is flagged when the trainer's own expected error (``predicted_fp32_error``) plus
    ours (``own_error``) exceeds ``tol``: there no method can match the trainer's result to ``tol``.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return []
    return [k for k in range(1, min(rank, s.numel()) + 1) if predicted_fp32_error(s, k) + own_error > tol]


def base_terms(weight: torch.Tensor, rank: int, sig_type: str = "principal", *, method: str = "auto",
               device=None, seed: int = 0) -> BaseTerms:
    """lycoris-lora's base terms for ``weight`` (out, in): top ``rank`` singular triplets.

    ``weight`` may be any float dtype (it is read in fp32 chunks, like lycoris' ``weight.float()``)
    and any device; ``device`` is where to compute (default: the weight's). ``rank`` larger than
    the matrix is padded as lycoris pads (zero vectors, lambda 1e-6).
    """
    if weight.ndim != 2:
        raise ValueError(f"base_terms needs a 2-D weight, got shape {tuple(weight.shape)}")
    with torch.no_grad():
        return _base_terms(weight.detach(), rank, sig_type, method, device, seed)


def _base_terms(weight, rank, sig_type, method, device, seed) -> BaseTerms:
    if device is not None:
        device = torch.device(device)
    out_f, in_f = weight.shape
    small = min(out_f, in_f)
    r = min(rank, small)
    if sig_type != "principal":
        p, s, q, s_all = _dense_full(weight, device)
        idx = _select(sig_type, s_all.numel(), r)
        p, lam, q = p[:, idx], s_all[idx], q[idx]
        ill = []  # not a prefix of the spectrum: conditioning is not the principal-gap kind
        method_used, est = "dense-full", 0.0
    else:
        k_need = min(r + 1, small)
        if method == "auto":
            method = "dense" if small <= max(DENSE_MAX, 4 * (2 * r)) else "iterative"
        if method == "dense":
            p, s, q = _dense_top(weight, k_need, device)
            est = 0.0
        elif method == "iterative":
            with _ieee_fp32():
                p, s, q, est_k = _iterative_top(weight, k_need, device, seed)
            est = float(est_k[:r].max())
            if not est <= ITERATIVE_MAX_ERROR:  # steep or pathological spectrum: be exact instead
                p, s, q = _dense_top(weight, k_need, device)
                est, method = 0.0, "dense (iterative did not converge)"
        else:
            raise ValueError(f"unknown method {method!r}")
        method_used = method
        own = OWN_ERROR["dense"] if method.startswith("dense") else max(est, OWN_ERROR["dense"])
        ill = ill_conditioned_boundaries(s, r, own_error=own)
        p, lam, q = p[:, :r], s[:r], q[:r]
    p = p.float().cpu()
    lam = lam.float().cpu()
    q = q.float().cpu()
    if r < rank:  # lycoris pads the missing ranks with zero vectors and lambda 1e-6
        pad = rank - r
        p = torch.nn.functional.pad(p, (0, pad))
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        lam = torch.nn.functional.pad(lam, (0, pad), value=1e-6)
    return BaseTerms(p.contiguous(), lam.contiguous(), q.contiguous(), ill, est, method_used)


@contextlib.contextmanager
def _one_thread():
    """Small LAPACK calls (eigh of a k x k matrix, QR/Cholesky of a tall block) on one thread: with
    more, OpenMP synchronisation costs 10-100x their work on a busy CPU."""
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
def _ieee_fp32():
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


def _select(sig_type: str, n: int, r: int) -> list[int]:
    """lycoris' ``sig_type`` choice of r singular triplets out of n."""
    if sig_type == "last":
        return list(range(n - r, n))
    if sig_type == "middle":
        start = (n - r) // 2
        return list(range(start, start + r))
    raise ValueError(f"unknown sig_type {sig_type!r} (principal, last, middle)")


def _oriented(weight: torch.Tensor, device):
    """``A`` = W or W^T so that A is tall (M >= N): the Gram matrix A^T A is the small one."""
    A = weight if weight.shape[0] >= weight.shape[1] else weight.t()
    if device is not None and A.device != device:
        A = A.to(device)
    return A, weight.shape[0] < weight.shape[1]


def _chunks(M: int, N: int, same_dtype: bool = False):
    """Row slices of an (M, N) matrix; one slice when no conversion (hence no copy) is needed."""
    step = M if same_dtype else max(1, _CHUNK_ELEMS // max(N, 1))
    for i in range(0, M, step):
        yield slice(i, min(M, i + step))


def _gram(A: torch.Tensor, dtype) -> torch.Tensor:
    """A^T A in ``dtype``, streaming A by rows (no full-size converted copy of W).

    Only the upper block triangle is multiplied (then mirrored): ~60% of a full product.
    """
    M, N = A.shape
    G = torch.zeros(N, N, dtype=dtype, device=A.device)
    nb = max(1, min(4, N // 256))
    edges = [round(i * N / nb) for i in range(nb + 1)]
    for sl in _chunks(M, N, A.dtype == dtype):
        Ac = A[sl].to(dtype)
        for j in range(nb):
            j0, j1 = edges[j], edges[j + 1]
            G[:j1, j0:j1].addmm_(Ac[:, :j1].t(), Ac[:, j0:j1])
    for j in range(nb):  # mirror the strictly-lower blocks from the upper ones
        j0, j1 = edges[j], edges[j + 1]
        G[j1:, j0:j1] = G[j0:j1, j1:].t()
    return G


def _times(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A @ X with A's rows converted chunk by chunk to X's dtype."""
    M, N = A.shape
    out = torch.empty(M, X.shape[1], dtype=X.dtype, device=X.device)
    for sl in _chunks(M, N, A.dtype == X.dtype):
        out[sl] = A[sl].to(X.dtype) @ X
    return out


def _times_t(A: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """A^T @ Y, streaming A by rows."""
    M, N = A.shape
    out = torch.zeros(N, Y.shape[1], dtype=Y.dtype, device=Y.device)
    for sl in _chunks(M, N, A.dtype == Y.dtype):
        out.addmm_(A[sl].to(Y.dtype).t(), Y[sl])
    return out


def _finish(A, transposed, V, s):
    """Left vectors U = A V / s in float64; returns (P, s, Q) of the original orientation."""
    U = _times(A, V)
    nz = s > 0
    U[:, nz] /= s[nz]
    U[:, ~nz] = 0  # zero singular values: the product is zero whatever the vectors
    if transposed:  # A = W^T: W = V s U^T
        return V, s, U.t()
    return U, s, V.t()


def _dense_top(weight, k, device):
    A, transposed = _oriented(weight, device)
    with _one_thread() if A.shape[1] <= 2 * DENSE_MAX else contextlib.nullcontext():
        G = _gram(A, torch.float64)
        with _one_thread():
            evals, evecs = torch.linalg.eigh(G)
        evals = evals.flip(0)[:k].clamp_min(0)
        V = evecs.flip(1)[:, :k].contiguous()
        del G, evecs
        return _finish(A, transposed, V, evals.sqrt())


def _dense_full(weight, device):
    """A float64 full SVD (for lycoris' ``last`` / ``middle`` choices, which need the whole spectrum)."""
    w = weight.to(device) if device is not None else weight
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u, s, vh, s


# --- Chebyshev-filtered subspace iteration -------------------------------------------------------
def _orthonormalize(X: torch.Tensor) -> torch.Tensor:
    """Cholesky-QR twice in float64 (BLAS-3, cheap for a tall block); Householder if it breaks."""
    with _one_thread():
        return _cholqr2(X)


def _cholqr2(X: torch.Tensor) -> torch.Tensor:
    Xd = X.double()
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Xd.t() @ Xd)
        if int(info) != 0:
            Xd = torch.linalg.qr(Xd)[0]
            continue
        Xd = torch.linalg.solve_triangular(L, Xd.t(), upper=False).t()
    return Xd.to(X.dtype)


def _upper_bound(G: torch.Tensor, gen: torch.Generator, steps: int = 24) -> float:
    """An upper bound of G's largest eigenvalue: Lanczos (full reorthogonalisation) + its residual."""
    n = G.shape[0]
    steps = min(steps, n)
    V = torch.zeros(n, steps + 1, dtype=torch.float64, device=G.device)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(G.device)
    V[:, 0] = v / v.norm()
    alphas, betas = [], []
    for j in range(steps):
        w = (G @ V[:, j].to(G.dtype)).double()
        alphas.append(float(w @ V[:, j]))
        for _ in range(2):
            w -= V[:, : j + 1] @ (V[:, : j + 1].t() @ w)
        b = float(w.norm())
        if b <= 1e-12 * max(abs(alphas[-1]), 1e-300):
            break
        betas.append(b)
        V[:, j + 1] = w / b
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    for i in range(k - 1):
        T[i, i + 1] = T[i + 1, i] = betas[i]
    ev, evec = torch.linalg.eigh(T)
    tail = betas[k - 1] if len(betas) >= k else 0.0
    return (float(ev[-1]) + abs(tail * float(evec[-1, -1]))) * (1 + 1e-3) + 1e-30


def _chebyshev(G: torch.Tensor, X: torch.Tensor, degree: int, cut: float, top: float) -> torch.Tensor:
    """p(G) X with p the degree-``degree`` Chebyshev polynomial small on [0, cut], p(top) = 1.

    Eigen-directions above ``cut`` grow like T_d((lambda - c) / e) relative to those below; the
    three-term recurrence is scaled by T_k at ``top`` so nothing overflows. G's diagonal is shifted
    in place for the duration (and restored exactly), so each degree is a single ``addmm``.
    """
    e = c = cut / 2
    l0 = (top - c) / e
    t_prev, t_cur = 1.0, l0
    diag = G.diagonal()
    saved = diag.clone()
    diag.sub_(c)  # G - cI, in place (restored exactly below): one BLAS call per degree
    try:
        Y_prev = X
        Y = torch.mm(G, X).mul_(1.0 / (e * l0))
        for _ in range(1, degree):
            t_next = 2 * l0 * t_cur - t_prev
            Y_next = torch.addmm(Y_prev, G, Y, beta=-t_prev / t_next, alpha=2 * t_cur / (e * t_next))
            Y_prev, Y = Y, Y_next
            t_prev, t_cur = t_cur, t_next
    finally:
        diag.copy_(saved)
    return Y


def _degree(res: float, tol: float, theta_k: float, cut: float, lo: int = 4, hi: int = 24) -> int:
    """Chebyshev degree that should bring the residual ``res`` to ``tol``: the k-th Ritz value's
    direction grows by T_d(l) against the damped interval [0, cut]."""
    l = 2 * theta_k / cut - 1
    if not (l > 1) or res <= tol:
        return lo if res <= tol else hi
    return int(min(hi, max(lo, math.ceil(math.acosh(res / tol) / math.acosh(l)) + 1)))


def _error_bound(R: torch.Tensor, s: torch.Tensor, last: float) -> torch.Tensor:
    """Per boundary j = 1..k: a bound on the relative error of the rank-j product.

    The residuals R[:, i] = A^T u_i - s_i v_i are orthogonal to the block, so they turn v_i towards
    directions outside it (singular values <= ``last``, the block's smallest Ritz value) by at most
    |R_i| / (s_i - last); that moves s_i u_i v_i^T by ~s_i times the angle.
    """
    res = R.norm(dim=0)
    gaps = (s - last).clamp_min(0)
    dev = torch.where(gaps > 0, res * s / gaps, torch.full_like(res, math.inf))
    norms = torch.sqrt(torch.cumsum(s * s, 0)).clamp_min(1e-300)
    return (torch.sqrt(torch.cumsum(dev * dev, 0)) / norms).cpu()


def _iterative_top(weight, k, device, seed, block: Optional[int] = None, tol32: float = 1e-6, max_iter: int = 40,
                   first_degree: int = 6, refine_target: float = 2e-6, refine_max: int = 0):
    A, transposed = _oriented(weight, device)
    M, N = A.shape
    b = min(N, block or max(2 * k, k + 32))
    G = _gram(A, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with _one_thread():
        top = _upper_bound(G, gen)
    X = _orthonormalize(G @ torch.randn(N, b, generator=gen).to(G.device))
    cut = degree = None
    prev_res = math.inf
    for _ in range(max_iter):
        if cut is not None:
            X = _orthonormalize(_chebyshev(G, X, degree, cut, top))
        GX = G @ X
        with _one_thread():
            H = X.double().t() @ GX.double()
            theta, Z = torch.linalg.eigh((H + H.t()) / 2)
            theta, Z = theta.flip(0), Z.flip(1)
            X = (X.double() @ Z).float()
            GX = (GX.double() @ Z).float()
            res = float(((GX[:, :k] - X[:, :k] * theta[:k].float()).norm(dim=0) / top).max())
        cut = max(float(theta[-1]), 1e-12 * top)
        if res < tol32 or res > 0.5 * prev_res:  # converged, or stuck at fp32's floor
            break
        prev_res = res
        # the first cut (from a barely filtered block) is far too low: a short filter refines it
        degree = _degree(res, tol32, float(theta[k - 1]), cut) if degree is not None else first_degree
    del G, GX
    # Rayleigh-Ritz against A itself in float64 (exact inside the block, whatever fp32 did), then
    # float64 subspace steps while the error bound says fp32 was not enough (steep spectra: the
    # smallest wanted singular values are below what an fp32 Gram matrix resolves)
    Q = X.double()
    for step in range(refine_max + 1):
        Zm = _times(A, Q)
        with _one_thread():
            Uz, Sz, Vzh = torch.linalg.svd(Zm, full_matrices=False)
            V = Q @ Vzh.t()
        U, s = Uz[:, :k], Sz[:k]
        V = V[:, :k].contiguous()
        est = _error_bound(_times_t(A, U) - V * s, s, float(Sz[-1]) if Sz.numel() > k else 0.0)
        if float(est.max()) <= refine_target or step == refine_max:
            break
        with _one_thread():
            Q = torch.linalg.qr(_times_t(A, Zm))[0]
    if transposed:
        return V, s, U.t(), est
    return U, s, V.t(), est
