"""Block Lanczos on A^T A in fp32 (full reorthogonalisation): the CPU's method for large layers.

It searches the whole Krylov space for the wanted directions rather than one block, which is what
makes clustered (random, Marchenko-Pastur) spectra affordable, and needs about one fp32 weight of
extra memory.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import accuracy, cpu_kernels, products, settings

CERTIFY_PAD = 16  # Ritz vectors beyond the wanted ones in the final float64 Rayleigh-Ritz block
CHECK_GROWTH = 3  # Ritz pairs are checked at most when the Krylov space has grown by 1/CHECK_GROWTH
# with the Gram matrix at hand, Lanczos restarts on its shifted inverse when the first check is far
# from converged and the top is flat: s_(k+1)^2 >= FLAT_TOP s_1^2 (``ShiftInvert``; measured: no
# gain at 0.66, 2.8x fewer Krylov vectors at 0.92)
FLAT_TOP = 0.8


def top_triplets(weight, k, device, seed, block: Optional[int] = None, use_gram: Optional[bool] = None,
                 shift_invert: Optional[bool] = None):
    """Top-k singular triplets by block Lanczos on A^T A (full reorthogonalisation, fp32 products).

    Every product is one pass over A with a thin block; the Krylov space (not just a block) is
    searched for the wanted directions, which is what makes clustered (random) spectra affordable.
    Ritz pairs are checked against per-boundary targets (``accuracy.targets``) on a geometric
    schedule, then where the trend of the misses says they will be met (``next_check_in``). With
    the Gram matrix, a first check far from the targets on a flat top restarts on
    (sigma I - G)^-1 (``ShiftInvert``; ``shift_invert`` True / False forces it on / off). The
    result is certified with float64 residuals against A (``accuracy.certify``), and where fp32
    products cannot resolve the wanted directions (steep spectra), float64 subspace steps refine it.
    """
    A, transposed = products.oriented(weight, device)
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
    G = products.gram(A, torch.float32) if use_gram else None
    gen = torch.Generator().manual_seed(seed)
    times_ata = None if G is not None else cpu_kernels.times_ata(A, b, copy_ok=A.data_ptr() == weight.data_ptr())
    # the orthonormal Krylov basis, one vector per row: every block, and every prefix of blocks the
    # reorthogonalisation reads, is one contiguous piece of memory
    V = torch.empty(L_max, N, dtype=torch.float32, device=A.device)
    H = torch.zeros(0, 0, dtype=torch.float64)  # the block-tridiagonal projection V A^T A V^T
    V[:b] = products.orthonormal_rows(torch.randn(b, N, generator=gen).to(A.device))[0]
    j, check_at = 0, max(4 * k, 8 * b)
    theta = Z = None
    misses = []  # (j, log10 of the worst bound / target) at every failed check
    shift, tried_shift = None, False  # set when the run restarts on (sigma I - G)^-1 (``ShiftInvert``)
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
        Qn, R = products.orthonormal_rows(Y)
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
                theta, Z = top_eigh(H[:j, :j], k + CERTIFY_PAD, rough)
                C = R.cpu() @ Z[j - b: j, :k]  # the Ritz vectors' residuals, c_i^T (next block)
                if shift is not None:
                    theta, gram_res = shift.eigen(theta, C, Qn)
                else:
                    gram_res = C.norm(dim=0)
                sv = theta.clamp_min(0).sqrt()
                # Gram residual / s_i = singular residual |A^T u_i - s_i v_i| (u_i = A v_i / s_i)
                res = gram_res / sv[:k].clamp_min(1e-300)
                est = accuracy.error_bound(res, sv[:k], float(sv[min(k + CERTIFY_PAD, sv.numel()) - 1]))[: k - 1]
                worst = float((est / accuracy.targets(sv[:k], k)).max())
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
                shift = ShiftInvert.above(G, float(theta[0]), float(gram_res[0]))
                if shift is not None:
                    G = None
                V = torch.empty(L_max, N, dtype=torch.float32, device=A.device)
                V[:b] = products.orthonormal_rows(torch.randn(b, N, generator=gen).to(A.device))[0]
                H = torch.zeros(0, 0, dtype=torch.float64)
                j, check_at = 0, max(4 * k, 8 * b)
                continue
            misses.append((j, math.log10(worst)))
            check_at = j + next_check_in(misses, j, b)
    del H, G, times_ata, shift  # the operator (reordered copies, Gram matrix or factor) first
    # the Ritz vectors in float64 (they keep the basis exact), converting the basis a chunk at a time
    Zt = Z.t().contiguous().to(V.device)
    Q = torch.zeros(Zt.shape[0], N, dtype=torch.float64, device=A.device)
    for rows, Vc in products.row_chunks(V[:j], torch.float64):
        Q.addmm_(Zt[:, rows], Vc)
    del V
    return accuracy.certify(A, transposed, Q, k)


class ShiftInvert:
    """The operator (sigma I - G)^-1 through a Cholesky factor, sigma just above G's top eigenvalue.

    It maps G's top eigenvalues lambda to mu = 1 / (sigma - lambda), spread far apart from the rest.
    Worth it where the top of the spectrum is flat (random, Marchenko-Pastur layers): a 12288 x 3072
    one then needs ~330 Krylov vectors for r = 64 instead of ~930, which saves more
    reorthogonalisation and checks than the factorisation (N^3 / 3) and the two triangular solves
    per block (each dearer than a product with G) cost. With a decaying spectrum it is slower
    (measured).
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
        """``X (sigma I - G)^-1`` for the rows X (column-major solves: faster than row-major)."""
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


def next_check_in(misses, j: int, b: int) -> int:
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


def top_eigh(H: torch.Tensor, n: int, rough: bool = False):
    """The ``n`` largest eigenpairs of the symmetric float64 ``H``, descending. SciPy's subset
    ``syevx`` (tridiagonalise, bisect, inverse-iterate only n vectors) is faster than a full
    ``eigh`` at the sizes here; torch's is the fallback. ``rough``: in float32, faster still, for
    a check that only has to tell how far from converged the Ritz pairs still are."""
    n = min(n, H.shape[0])
    try:
        from scipy.linalg import eigh
    except ImportError:
        with settings.one_thread():
            theta, Z = torch.linalg.eigh(H.float() if rough else H)
        return theta.double().flip(0)[:n], Z.double().flip(1)[:, :n]
    m = H.shape[0]
    with settings.scipy_blas_one_thread():
        theta, Z = eigh((H.float() if rough else H).numpy(), subset_by_index=[m - n, m - 1], driver="evx",
                        check_finite=False)
    return torch.from_numpy(theta[::-1].copy()).double(), torch.from_numpy(Z[:, ::-1].copy()).double()
