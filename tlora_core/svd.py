"""The top singular triplets of a base weight: LyCORIS ``tlora``'s frozen base terms, rebuilt fast.

LyCORIS files do not store their base terms ``P0 diag(lambda0) Q0``: they are the top-r singular
triplets of the adapted base weight W (fp32, ``sig_type="principal"``), which lycoris-lora took
with a full ``torch.linalg.svd``. A full SVD of every layer is the slow part of loading such a file
(seconds to a minute per layer at real width), and only r (<= 128 or so) of its thousands of
triplets are used. Here only those are computed:

- ``dense``: the Gram matrix of the smaller side in float64 and ``eigh``; exact to float64 and the
  fastest for small layers (tests, tiny models).
- ``subspace`` (the GPU's choice past GPU_DENSE_MAX): Chebyshev-filtered subspace iteration on
  that float64 Gram matrix: a block of ~2r vectors, a few dozen float64 products with the Gram
  matrix and one small ``eigh`` per filter, then the float64 certification below. A GPU runs such
  products at tens of TFLOPS while its full ``eigh`` is latency-bound (measured on an H100, rank
  64: 21 ms for a random 3072 x 3072 layer against dense's 71 ms, 35 ms against 78 ms for a
  12288 x 3072 one; cuSOLVER's full fp32 SVD takes 590 ms).
- ``lanczos``: block Lanczos (full reorthogonalisation) on W^T W in fp32 (products with W itself,
  or with its Gram matrix for a tall W), which searches the whole Krylov space rather than one
  block. The extra memory is about one fp32 weight (on an x86-64 CPU a square-ish layer's
  products use two oneDNN-reordered copies of it: 1.8x faster than MKL's thin products there).
  A random (Marchenko-Pastur) layer, the hardest case, needs ~770 Krylov vectors for r = 64 at
  width 3072, a trained-like one far fewer; a tall one with such a flat top restarts on the Gram
  matrix's shifted inverse (~330 instead of ~930). It stops when every boundary is as exact as
  the trainer's own fp32 SVD can be there (or 1e-6), then a float64 Rayleigh-Ritz step against W
  itself certifies that with true residuals.

Only products are defined, not the signs of singular vectors; and where two singular values at a
mask boundary nearly coincide, the split between "active" and "inactive" base ranks is defined
only up to the trainer's fp32 rounding: ``BaseTerms.ill_conditioned`` lists those boundaries
(see ``ill_conditioned_boundaries``), for every method alike.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
from dataclasses import dataclass, field
from typing import Optional

import torch

EPS32 = float(torch.finfo(torch.float32).eps)
# Products at a mask boundary are compared with the trainer's fp32 SVD to this relative error.
REPRODUCIBLE_TOL = 1e-5
FP32_SVD_C = 8.0  # see predicted_fp32_error (measured up to ~6)
FP32_SVD_FLOOR = 2e-6  # rounding of the fp32 factors themselves (measured <= 1.5e-6)
DENSE_OWN_ERROR = 3e-7  # measured vs float64 SVDs (products of the fp32 output)
# Lanczos stops when every boundary's a-posteriori bound is below this, or below a quarter of the
# trainer's own fp32 rounding there (``_targets``); a bound above both this and that rounding
# falls back to the dense float64 method
LANCZOS_TARGET = 1e-6
LANCZOS_MAX_ERROR = 1e-5
CERTIFY_PAD = 16  # Ritz vectors beyond the wanted ones in the final float64 Rayleigh-Ritz block
CHECK_GROWTH = 3  # Ritz pairs are checked at most when the Krylov space has grown by 1/CHECK_GROWTH
# with the Gram matrix at hand, Lanczos restarts on its shifted inverse when the first check is far
# from converged and the top is flat: s_(k+1)^2 >= FLAT_TOP s_1^2 (``_ShiftInvert``; measured: no
# gain at 0.66, 2.8x fewer Krylov vectors at 0.92)
FLAT_TOP = 0.8
DENSE_MAX = 768  # smaller side at or below this: dense float64 (fast enough, exact)
GPU_DENSE_MAX = 2048  # the same on a GPU (H100: dense 22 ms against 26 ms at 1536, 71 against 21 at 3072)
# subspace iteration: at most this many filters (then dense); each filter's degree is what the
# worst boundary still needs (``_filter``), capped so that the block's top direction cannot
# outgrow its k-th by more than FILTER_SPREAD (its k-th must survive the next orthonormalisation)
SUBSPACE_MAX_FILTERS = 8
FILTER_MAX_DEGREE = 40
FILTER_SPREAD = 1e8
STALLED = 0.5  # a filter that leaves the worst bound above this share of what it was: give up
ONE_PASS_MAX_KAPPA = 1e4  # ``_orthonormal_rows``: eps64 * 1e4 ~ 2e-12, far below eps32
_CHUNK_ELEMS = 1 << 21  # elements per chunk when streaming W (keeps converted copies small)


@dataclass
class BaseTerms:
    """``P0 (out, r)``, ``lambda0 (r,)``, ``Q0 (r, in)`` in float32, as lycoris-lora stores them."""

    p: torch.Tensor
    lam: torch.Tensor
    q: torch.Tensor
    # mask boundaries k (k ranks active) where s_k and s_{k+1} nearly coincide: the trainer's own
    # fp32 SVD reproduces the base term there only to ~ eps32 * s_1 / (s_k - s_{k+1})
    ill_conditioned: list = field(default_factory=list)
    est_error: float = 0.0  # a-posteriori bound on this computation's own error in the products (lanczos)
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


def predicted_fp32_errors(s: torch.Tensor, n: int) -> torch.Tensor:
    """``predicted_fp32_error(s, k)`` for k = 1..n at once (float64, CPU): the per-boundary loop
    costs ~1 ms of scalar reads per call, and the iterations check every boundary each round."""
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
            on_gpu = (device if device is not None else weight.device).type == "cuda"
            if small <= max(GPU_DENSE_MAX if on_gpu else DENSE_MAX, 4 * (2 * r)):
                method = "dense"
            else:
                method = "subspace" if on_gpu else "lanczos"
        if method == "dense":
            p, s, q = _dense_top(weight, k_need, device)
            own = [DENSE_OWN_ERROR] * r
        elif method in ("lanczos", "subspace"):
            found = None
            with _ieee_fp32():
                if method == "lanczos":
                    found = _lanczos_top(weight, k_need, device, seed)
                else:
                    found = _subspace_top(weight, k_need, device, seed)
            if found is not None:
                p, s, q, est_k = found
                own = [max(float(e), DENSE_OWN_ERROR) for e in est_k[:r]] + [DENSE_OWN_ERROR] * (r - est_k.numel())
                trainer = predicted_fp32_errors(s, r).tolist()
            if found is None or any(e > max(LANCZOS_MAX_ERROR, t) for e, t in zip(own, trainer)):
                # not as exact as the trainer's own rounding somewhere (pathological spectrum)
                p, s, q = _dense_top(weight, k_need, device)
                own, method = [DENSE_OWN_ERROR] * r, f"dense ({method} did not converge)"
        else:
            raise ValueError(f"unknown method {method!r}")
        method_used = method
        est = max(own, default=0.0)
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


def _row_chunks(A: torch.Tensor, dtype):
    """``(rows, A[rows] in dtype)`` for consecutive row slices of A: A itself when no conversion is
    needed, else chunks converted into one reused buffer (no full-size copy, no fresh pages per
    chunk: a new multi-MB CPU allocation costs more in page faults than its conversion)."""
    M, N = A.shape
    if A.dtype == dtype:
        yield slice(0, M), A
        return
    step = max(1, _CHUNK_ELEMS // max(N, 1))
    # A = W^T (a wide weight) is read in W's own layout, a block of W's columns at a time, and the
    # chunk handed on transposed: gathering A's rows would transpose element by element (~5x slower)
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


def _gram(A: torch.Tensor, dtype) -> torch.Tensor:
    """A^T A in ``dtype``, streaming A by rows (no full-size converted copy of W).

    Only the upper block triangle is multiplied (then mirrored): ~56% of a full product.
    """
    M, N = A.shape
    G = torch.zeros(N, N, dtype=dtype, device=A.device)
    nb = max(1, min(8, N // 256))
    edges = [round(i * N / nb) for i in range(nb + 1)]
    for _, Ac in _row_chunks(A, dtype):
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
    for rows, Ac in _row_chunks(A, X.dtype):
        torch.mm(Ac, X, out=out[rows])
    return out


def _times_both_rows(A: torch.Tensor, Q: torch.Tensor):
    """``(Q A^T, Q A^T A)`` for the rows ``Q`` (m, N), in Q's dtype, from one streamed pass over A's
    rows. (Products in this orientation run ~1.5x faster than ``A @ Q^T`` at these shapes.)"""
    M, N = A.shape
    QAt = torch.empty(Q.shape[0], M, dtype=Q.dtype, device=Q.device)
    QG = torch.zeros(Q.shape[0], N, dtype=Q.dtype, device=Q.device)
    for rows, Ac in _row_chunks(A, Q.dtype):
        QAt[:, rows] = Q @ Ac.t()
        QG.addmm_(QAt[:, rows], Ac)
    return QAt, QG


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
    cpu = A.device.type == "cpu"
    with _one_thread() if cpu and A.shape[1] <= 2 * DENSE_MAX else contextlib.nullcontext():
        G = _gram(A, torch.float64)
        with _one_thread() if cpu else contextlib.nullcontext():
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


# --- Chebyshev-filtered subspace iteration (GPUs) ---------------------------------------------
def _subspace_top(weight, k, device, seed):
    """Top-k singular triplets by Chebyshev-filtered subspace iteration on G = A^T A in float64, or
    None where it does not converge (the caller then goes dense).

    A block X of b ~ 2k orthonormal rows; each round is a Rayleigh-Ritz step (X G X^T, one b x b
    ``eigh``), the per-boundary bounds of ``_error_bound`` from its residuals, and where they miss
    their targets a filter T_d((2G - c) / c) with c the block's smallest Ritz value: it damps every
    direction below c (those outside the block) against the wanted ones above it by 1 / T_d(x_k),
    x_k = 2 theta_k / c - 1 (Zhou & Saad's ChFSI). Random (Marchenko-Pastur) layers of width
    3072 take ~4 rounds and 40-50 products with G; decaying spectra 3 rounds and ~8. The Ritz
    vectors are then certified against A itself (``_certify``).
    """
    A, transposed = _oriented(weight, device)
    N = A.shape[1]
    G = _gram(A, torch.float64)
    b = min(N, max(2 * k, k + 64))
    gen = torch.Generator(G.device).manual_seed(seed)
    X = _orthonormal_rows(torch.randn(b, N, generator=gen, dtype=torch.float64, device=G.device))[0]
    worst_before = math.inf
    for left in range(SUBSPACE_MAX_FILTERS, -1, -1):
        GX = X @ G  # rows of (G X^T)^T: G is symmetric
        H = (GX @ X.t()).cpu()
        with _one_thread():
            theta, Z = torch.linalg.eigh((H + H.t()) / 2)
        theta, Zt = theta.flip(0), Z.flip(1).t().contiguous().to(G.device)
        X, GX = Zt @ X, Zt @ GX  # the Ritz vectors, descending
        sv = theta.clamp_min(0).sqrt()
        gram_res = (GX[:k] - theta[:k, None].to(G.device) * X[:k]).norm(dim=1).cpu()
        est = _error_bound(gram_res / sv[:k].clamp_min(1e-300), sv[:k], float(sv[-1]))[: k - 1]
        worst = float((est / _targets(sv[:k], k)).max()) if k > 1 else 0.0
        if worst <= 1.0:
            break
        if worst > STALLED * worst_before:
            return None  # the last filter did not work: not this method's case
        filt = _filter(theta, k, worst)
        if filt is None or filt[1] * left < math.log(worst):
            return None  # too slow to finish in the filters left (steep spectra: the cap on the degree)
        worst_before, degree = worst, filt[0]
        X = _orthonormal_rows(_chebyshev(G, X, GX, degree, float(theta[-1])))[0]
    del G, GX
    return _certify(A, transposed, X, k)  # the whole block: its smallest Ritz value bounds what is outside


def _filter(theta: torch.Tensor, k: int, worst: float) -> Optional[tuple[int, float]]:
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


def _chebyshev(G: torch.Tensor, X: torch.Tensor, GX: torch.Tensor, degree: int, cut: float) -> torch.Tensor:
    """Rows of T_degree((2G - cut I) / cut) X^T by the three-term recurrence (``GX`` = X G given)."""
    c = cut / 2
    prev, cur = X, (GX - c * X) / c
    for _ in range(degree - 1):
        nxt = cur @ G
        nxt.sub_(cur, alpha=c).mul_(2 / c).sub_(prev)
        prev, cur = cur, nxt
    return cur


# --- block Lanczos ----------------------------------------------------------------------------
def _orthonormal_rows(X: torch.Tensor):
    """Cholesky-QR in float64 on the rows of the short, wide ``X`` (b, N): ``X = R^T Q`` with
    orthonormal rows ``Q`` (X's dtype) and upper-triangular ``R`` (float64). BLAS-3 and cheap;
    Householder QR where Cholesky breaks down. Twice, except for a well-conditioned fp32 ``X``
    (kappa(X X^T) <= ONE_PASS_MAX_KAPPA, as Lanczos blocks of flat spectra are): one pass then
    leaves an error ~eps64 * kappa, far below the rounding of Q to fp32."""
    with _one_thread():
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


def _targets(s: torch.Tensor, k: int) -> torch.Tensor:
    """How exact boundary j must be: LANCZOS_TARGET, or a quarter of the trainer's own fp32 rounding
    there (``predicted_fp32_error``) when that is larger: added in quadrature, it then changes the
    achievable agreement with the trainer by < 3%."""
    return (0.25 * predicted_fp32_errors(s, k - 1)).clamp_min(LANCZOS_TARGET)


def _top_eigh(H: torch.Tensor, n: int, rough: bool = False):
    """The ``n`` largest eigenpairs of the symmetric float64 ``H``, descending. SciPy's subset
    ``syevx`` (tridiagonalise, bisect, inverse-iterate only n vectors) is 2-3x faster than a full
    ``eigh`` at the sizes here; torch's is the fallback. ``rough``: in float32, 2x faster, for a
    check that only has to tell how far from converged the Ritz pairs still are."""
    n = min(n, H.shape[0])
    try:
        from scipy.linalg import eigh
    except ImportError:
        with _one_thread():
            theta, Z = torch.linalg.eigh(H.float() if rough else H)
        return theta.double().flip(0)[:n], Z.double().flip(1)[:, :n]
    m = H.shape[0]
    with _scipy_blas_one_thread():
        theta, Z = eigh((H.float() if rough else H).numpy(), subset_by_index=[m - n, m - 1], driver="evx",
                        check_finite=False)
    return torch.from_numpy(theta[::-1].copy()).double(), torch.from_numpy(Z[:, ::-1].copy()).double()


def _scipy_blas_one_thread():
    """SciPy's own BLAS (OpenBLAS) on one thread. Its idle workers spin for a while after every
    call, taking a core from torch's: on a 2-core CPU that made every product of the Lanczos loop
    ~1.5x slower (measured: 0.74 s instead of 1.1 s for a 3072-wide layer with one thread)."""
    try:
        controller = _blas_controller()
    except ImportError:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


@functools.lru_cache(maxsize=None)
def _blas_controller():
    """One threadpoolctl controller, made after SciPy is loaded: a fresh ``threadpool_limits``
    scans every loaded library each time (5 ms per check in a ComfyUI process, 0.03 ms cached)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _lanczos_top(weight, k, device, seed, block: Optional[int] = None, use_gram: Optional[bool] = None,
                 shift_invert: Optional[bool] = None):
    """Top-k singular triplets by block Lanczos on A^T A (full reorthogonalisation, fp32 products).

    Every product is one pass over A with a thin block; the Krylov space (not just a block) is
    searched for the wanted directions, which is what makes clustered (random) spectra affordable.
    Ritz pairs are checked against per-boundary targets (``_targets``) on a geometric schedule,
    then where the trend of the misses says they will be met (``_next_check_in``). With the Gram
    matrix, a first check far from the targets on a flat top restarts on (sigma I - G)^-1
    (``_ShiftInvert``; ``shift_invert`` True / False forces it on / off). The result is
    certified with float64 residuals against A, and where fp32 products cannot resolve the
    wanted directions (steep spectra), float64 subspace steps refine it.
    """
    A, transposed = _oriented(weight, device)
    if A.dtype != torch.float32:  # one fp32 copy (lycoris' weight.float()): products in fp32
        A = A.float()
    M, N = A.shape
    b = min(block or (16 if A.device.type == "cpu" else 64), N)
    L_max = (N // b) * b
    # on a tall A (M >= 2N) the Gram matrix (one fp32 N x N) makes every product 2-4x cheaper and
    # pays for itself after a few hundred Krylov vectors; on a square one, thin products with A
    # itself cost no more, and far less when the spectrum converges fast (measured, 2-core CPU)
    if use_gram is None:
        use_gram = M >= 2 * N
    G = _gram(A, torch.float32) if use_gram else None
    gen = torch.Generator().manual_seed(seed)
    times_ata = None if G is not None else _times_ata(A, b, copy_ok=A.data_ptr() == weight.data_ptr())
    # the orthonormal Krylov basis, one vector per row: every block, and every prefix of blocks the
    # reorthogonalisation reads, is one contiguous piece of memory
    V = torch.empty(L_max, N, dtype=torch.float32, device=A.device)
    H = torch.zeros(0, 0, dtype=torch.float64)  # the block-tridiagonal projection V A^T A V^T
    V[:b] = _orthonormal_rows(torch.randn(b, N, generator=gen).to(A.device))[0]
    j, check_at = 0, max(4 * k, 8 * b)
    theta = Z = None
    misses = []  # (j, log10 of the worst bound / target) at every failed check
    shift, tried_shift = None, False  # set when the run restarts on (sigma I - G)^-1 (``_ShiftInvert``)
    while True:
        X = V[j: j + b]
        if shift is not None:  # X (sigma I - A^T A)^-1
            Y = shift.solve(X)
        else:  # X A^T A
            Y = (G @ X.t()).t().contiguous() if G is not None else times_ata(X)
        # the block three-term recurrence (against blocks j and j-1), then one classical Gram-Schmidt
        # pass against the whole basis for what rounding left (full reorthogonalisation)
        lo = max(0, j - b)
        local = V[lo: j + b]
        C = Y @ local.t()
        Y -= C @ local
        basis = V[: j + b]
        C2 = Y @ basis.t()
        Y -= C2 @ basis
        D = (C[:, j - lo:] + C2[:, j:]).double().cpu()
        if H.shape[0] < j + 2 * b:  # grow geometrically (a full L_max^2 float64 would be ~N^2)
            H = torch.nn.functional.pad(H, (0, j + 2 * b, 0, j + 2 * b))
        H[j: j + b, j: j + b] = (D + D.t()) / 2
        Qn, R = _orthonormal_rows(Y)
        j += b
        last = j + b > L_max
        if not last:
            H[j: j + b, j - b: j] = R.cpu()
            H[j - b: j, j: j + b] = R.t().cpu()
            V[j: j + b] = Qn
        if j >= check_at or last:
            # far from converged at the last check (bound > 1000x its target): float32 tells how far
            rough = not last and bool(misses) and misses[-1][1] >= 3
            while True:
                theta, Z = _top_eigh(H[:j, :j], k + CERTIFY_PAD, rough)
                C = R.cpu() @ Z[j - b: j, :k]  # the Ritz vectors' residuals, c_i^T (next block)
                if shift is not None:
                    theta, gram_res = shift.eigen(theta, C, Qn)
                else:
                    gram_res = C.norm(dim=0)
                sv = theta.clamp_min(0).sqrt()
                # Gram residual / s_i = singular residual |A^T u_i - s_i v_i| (u_i = A v_i / s_i)
                res = gram_res / sv[:k].clamp_min(1e-300)
                est = _error_bound(res, sv[:k], float(sv[min(k + CERTIFY_PAD, sv.numel()) - 1]))[: k - 1]
                worst = float((est / _targets(sv[:k], k)).max())
                if not (rough and worst <= 1.0):
                    break
                rough = False  # closer than it looked: decide in float64
            if last or worst <= 1.0:
                break
            if G is not None and not (misses or tried_shift) and shift_invert is not False and (
                    shift_invert or (worst >= 100 and theta[k] >= FLAT_TOP * theta[0])):
                # restart on the shifted inverse: the basis's memory goes to the factor, which
                # then replaces G (a factorisation that fails restarts plain, once)
                tried_shift, V = True, None
                X = local = basis = None  # views of V: V's memory is free only without them
                shift = _ShiftInvert.above(G, float(theta[0]), float(gram_res[0]))
                if shift is not None:
                    G = None
                V = torch.empty(L_max, N, dtype=torch.float32, device=A.device)
                V[:b] = _orthonormal_rows(torch.randn(b, N, generator=gen).to(A.device))[0]
                H = torch.zeros(0, 0, dtype=torch.float64)
                j, check_at = 0, max(4 * k, 8 * b)
                continue
            misses.append((j, math.log10(worst)))
            check_at = j + _next_check_in(misses, j, b)
    del H, G, times_ata, shift  # the operator (reordered copies, Gram matrix or factor) first
    # the Ritz vectors in float64 (they keep the basis exact), converting the basis a chunk at a time
    Zt = Z.t().contiguous().to(V.device)
    Q = torch.zeros(Zt.shape[0], N, dtype=torch.float64, device=A.device)
    for rows, Vc in _row_chunks(V[:j], torch.float64):
        Q.addmm_(Zt[:, rows], Vc)
    del V
    return _certify(A, transposed, Q, k)


def _times_ata(A: torch.Tensor, b: int, copy_ok: bool):
    """``X -> X A^T A`` for blocks of ``b`` rows X: Lanczos' product without the Gram matrix.

    On an x86-64 CPU through oneDNN with A and A^T reordered for b-row inputs
    (``_onednn_times_ata``; measured there only: other CPUs keep their BLAS); elsewhere A^T is one
    row-major copy (when A needed none, ``copy_ok``): ~20% faster than a product with a transposed
    operand at these thin shapes.
    """
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    packed = _onednn_times_ata(A, b) if A.device.type == "cpu" and x86 else None
    if packed is not None:
        return packed
    At = A.t().contiguous() if copy_ok else A.t()
    return lambda X: (At @ (A @ X.t())).t().contiguous()


def _onednn_times_ata(A: torch.Tensor, b: int):
    """``X -> X A^T A`` through oneDNN's linear with A and A^T reordered once into its blocked
    layout for b-row inputs (two copies of A), or None where this build lacks that or does not
    compute it in full fp32 (``_onednn_is_fp32``).

    MKL's thin sgemm runs far below the memory bandwidth at b = 16; the reordered products are
    1.7-1.9x faster (3072 x 3072 fp32 on a 2-core AMD CPU: 3.8 ms per block against 6.9 ms; the two
    reorders cost ~60 ms, about 20 blocks' saving).
    """
    if not _onednn_is_fp32(_onednn_fp32_math()):
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
def _onednn_is_fp32(math_setting: str) -> bool:
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


class _ShiftInvert:
    """The operator (sigma I - G)^-1 through a Cholesky factor, sigma just above G's top eigenvalue.

    It maps G's top eigenvalues lambda to mu = 1 / (sigma - lambda), spread far apart from the rest.
    Worth it where the top of the spectrum is flat (random, Marchenko-Pastur layers): a 12288 x 3072
    one then needs ~330 Krylov vectors for r = 64 instead of ~930, which saves more
    reorthogonalisation and checks than the factorisation (N^3 / 3) and the two triangular solves
    per block (2.5x a product with G) cost. With a decaying spectrum it is slower (measured).
    """

    def __init__(self, sigma: float, chol: torch.Tensor):
        self.sigma, self.chol = sigma, chol

    @classmethod
    def above(cls, G: torch.Tensor, top: float, top_residual: float, tries: int = 4):
        """Factor sigma I - G for sigma a little above the top Ritz value ``top`` (<= G's top
        eigenvalue, within about its residual). Cholesky itself proves sigma is above G's top: it
        fails otherwise, and sigma is raised. None where it keeps failing."""
        if not (math.isfinite(top) and top > 0):
            return None
        margin = max(2 * top_residual, 0.01 * top)
        buf, info = torch.empty_like(G), torch.empty((), dtype=torch.int32, device=G.device)
        L = buf.mT  # column-major (LAPACK's layout: factored in place with one temporary copy, not two)
        for _ in range(tries):
            sigma = top + margin
            torch.neg(G, out=buf).diagonal().add_(sigma)  # symmetric: buf and L are the same matrix
            torch.linalg.cholesky_ex(L, out=(L, info))
            if int(info) == 0:
                return cls(sigma, L)
            margin *= 4
        return None

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """``X (sigma I - G)^-1`` for the rows X (column-major solves: 2x faster than row-major)."""
        Z = torch.linalg.solve_triangular(self.chol, X.t().contiguous(), upper=False)
        return torch.linalg.solve_triangular(self.chol.mT, Z, upper=True).t().contiguous()

    def eigen(self, mu: torch.Tensor, C: torch.Tensor, Qn: torch.Tensor):
        """G's Ritz values ``sigma - 1/mu`` and their residual norms for G.

        An operator residual r_i = c_i^T Qn is one of |(sigma I - G) r_i| / mu_i for G, with
        (sigma I - G) = L L^T: c_i^T (Qn L L^T), from two products of the next block with L.
        """
        lam = self.sigma - 1 / mu.clamp_min(1e-300)
        W = ((Qn @ self.chol) @ self.chol.mT).double().cpu()  # Qn (sigma I - G)
        return lam, (C.t() @ W).norm(dim=1) / mu[: C.shape[1]]


def _next_check_in(misses, j: int, b: int) -> int:
    """Krylov vectors to add before the next check: where a parabola through the last three misses
    (the bound falls ever faster as Lanczos converges) predicts the targets met with a 2x margin,
    at least one block and at most 1/CHECK_GROWTH of the space. An eigh of the projection costs
    as much as several blocks near the end, so checks are placed rather than repeated."""
    grow = max(b, (j // CHECK_GROWTH) // b * b)
    if len(misses) < 3 or not all(math.isfinite(y) for _, y in misses[-3:]):
        return grow
    (x0, y0), (x1, y1), (x2, y2) = misses[-3:]
    goal = math.log10(0.5)
    s01, s12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    curv = (s12 - s01) / (x2 - x0)  # y'' / 2
    slope = s12 + curv * (x2 - x1)  # y' at x2
    if slope >= 0:
        return grow
    if curv < 0:  # y2 + slope d + curv d^2 = goal, smallest positive root
        d = (-slope - math.sqrt(slope * slope - 4 * curv * (y2 - goal))) / (2 * curv)
    else:
        d = (goal - y2) / slope
    return int(min(grow, max(b, math.ceil(d / b) * b))) if math.isfinite(d) else grow


def _certify(A, transposed, Q, k, refine_max: int = 6):
    """Rayleigh-Ritz against A in float64 on the rows ``Q`` (k wanted + a few more Ritz vectors),
    and the error of every boundary from the float64 residuals ``A^T u_i - s_i v_i``
    (``_error_bound``); float64 subspace steps while that misses the targets (fp32 products
    resolve a direction only to ~eps32 s_1^2 / (s_i^2 - s_(i+1)^2): steep spectra)."""
    Q = _orthonormal_rows(Q.double())[0]  # the fp32 basis is orthonormal only to ~1e-7: exact first
    for step in range(refine_max + 1):
        QAt, QG = _times_both_rows(A, Q)
        with _one_thread():  # Q A^T = Vz S U^T, with Vz from the small Q A^T A Q^T = Vz S^2 Vz^T
            S2, Vz = torch.linalg.eigh((QG @ Q.t() + Q @ QG.t()) / 2)
        Vzk = Vz.flip(1)[:, :k]
        SUt = Vzk.t() @ QAt
        s = SUt.norm(dim=1)  # |A v_i|: exact even where s^2 drowns in float64 rounding
        inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        U = SUt * inv[:, None]  # left singular vectors, as rows
        V = Vzk.t() @ Q  # right singular vectors, as rows
        last = math.sqrt(max(float(S2[0]), 0.0)) if S2.numel() > k else 0.0
        ATU = (Vzk.t() @ QG) * inv[:, None]  # rows of (A^T U)^T = S^-1 Vz^T Q A^T A
        est = _error_bound((ATU - V * s[:, None]).norm(dim=1), s, last)[: k - 1]
        if bool((est <= _targets(s.cpu(), k)).all()) or step == refine_max:
            break
        Q = _orthonormal_rows(QG)[0]
    if transposed:  # A = W^T: W = V^T S U
        return V.t(), s, U, est
    return U.t(), s, V, est


def _error_bound(res: torch.Tensor, s: torch.Tensor, last: float) -> torch.Tensor:
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
