"""LyCORIS base terms rebuilt by tlora_core.svd, against independent references: torch.linalg.svd in
float64 and lycoris-lora's own TLoraModule (its fp32 SVD init, stored as base_p/base_lambda/base_q).

Only products are defined (singular-vector signs are arbitrary), so products are compared, for every
prefix mask. Where two singular values at a boundary nearly coincide, lycoris' own fp32 result is
not reproducible: those boundaries must be flagged, all others must match to 1e-5.
"""

from __future__ import annotations

import math
import platform

import pytest
import torch

from devkit.host import pack_module

svd = pack_module("tlora_core.svd")
# the parts tested on their own; a test that patches a name patches the module that looks it up
accuracy = pack_module("tlora_core.svd.accuracy")
cpu_kernels = pack_module("tlora_core.svd.cpu_kernels")
lanczos = pack_module("tlora_core.svd.lanczos")
products = pack_module("tlora_core.svd.products")
subspace = pack_module("tlora_core.svd.subspace")
TOL = 1e-5
# the GPU path (cuBLAS / cuSOLVER, TF32 kept off) where a GPU is there
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def spectrum_matrix(o, i, s, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = min(o, i)
    u = torch.linalg.qr(torch.randn(o, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(i, k, generator=g, dtype=torch.float64))[0]
    s = torch.as_tensor(s, dtype=torch.float64)
    return ((u[:, : s.numel()] * s) @ v[:, : s.numel()].t()).to(dtype)


def decaying(o, i, decay=0.93, seed=0):
    return spectrum_matrix(o, i, 2.0 * decay ** torch.arange(min(o, i), dtype=torch.float64), seed)


def prefix_products(p, lam, q, k):
    return (p[:, :k].double() * lam.reshape(-1)[:k].double()) @ q[:k].double()


def rel(a, b):
    n = b.norm().item()
    return (a - b).norm().item() / n if n else (a - b).norm().item()


def lycoris_module(weight, rank, sig_type="principal"):
    import lycoris.modules.tlora as lt

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    orig, threads = lt.gc.collect, torch.get_num_threads()
    lt.gc.collect = lambda *a: 0  # lycoris cleans up after every init; pure overhead here
    torch.set_num_threads(1)  # its small SVD: OpenMP sync dominates on a busy 2-core box
    try:
        return lt.TLoraModule("m", lin, lora_dim=rank, alpha=rank, sig_type=sig_type)
    finally:
        lt.gc.collect = orig
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["dense", "lanczos", "subspace"])
@pytest.mark.parametrize("shape", [(300, 200), (200, 330), (640, 160)])
def test_products_match_float64_svd(method, shape, device):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) / math.sqrt(shape[1])
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = 24
    t = svd.base_terms(w, r, method=method, device=device)
    assert t.p.shape == (shape[0], r) and t.q.shape == (r, shape[1]) and t.lam.shape == (r,)
    for k in range(1, r + 1):
        # as exact as the trainer's own fp32 SVD can be there, and never worse than 2e-6 (dense: always)
        allowed = 2e-6 if method == "dense" else max(2e-6, 0.5 * svd.predicted_fp32_error(s, k))
        ref = (u[:, :k] * s[:k]) @ vh[:k]
        assert rel(prefix_products(t.p, t.lam, t.q, k), ref) <= allowed, (method, k)
    # the singular values themselves
    assert torch.allclose(t.lam.double(), s[:r], rtol=1e-6)


@pytest.mark.parametrize("method", ["dense", "lanczos", "subspace"])
def test_matches_lycoris_own_base_at_every_prefix(method):
    """Separated (trained-like) spectrum: every boundary is well defined and must match lycoris."""
    w = decaying(192, 256, decay=0.8)
    r = 16
    mod = lycoris_module(w, r)
    t = svd.base_terms(w, r, method=method)
    assert t.ill_conditioned == []
    for k in range(1, r + 1):
        ref = prefix_products(mod.base_p, mod.base_lambda, mod.base_q, k)
        assert rel(prefix_products(t.p, t.lam, t.q, k), ref) <= TOL, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_layers_take_the_subspace_path():
    """On a GPU a layer past GPU_DENSE_MAX takes the filtered subspace iteration (float64 products
    there are fast, a full eigh is not), and it stays as exact as the trainer's fp32 SVD; a
    smaller one goes dense."""
    assert svd.base_terms(torch.randn(1280, 1024) / 32, 32, device="cuda").method == "dense"
    w = torch.randn(2560, 2304, generator=torch.Generator().manual_seed(4)) / 48
    t = svd.base_terms(w, 32, device="cuda")
    assert t.method == "subspace"
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for k in range(1, 33):
        allowed = max(2e-6, 0.5 * svd.predicted_fp32_error(s, k))
        assert rel(prefix_products(t.p, t.lam, t.q, k), (u[:, :k] * s[:k]) @ vh[:k]) <= allowed, k


def test_chebyshev_filter_is_the_polynomial_of_the_gram_matrix():
    """``subspace.chebyshev`` against T_d evaluated on G's eigenvalues (cos / cosh closed forms), float64."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(60, 40, generator=g, dtype=torch.float64)
    G = A.t() @ A
    X = torch.randn(5, 40, generator=g, dtype=torch.float64)
    lam, V = torch.linalg.eigh(G)
    cut, d = float(lam[30]), 7
    x = 2 * lam / cut - 1
    t = torch.where(x.abs() <= 1, torch.cos(d * torch.acos(x.clamp(-1, 1))), torch.cosh(d * torch.acosh(x.abs().clamp_min(1))))
    want = X @ V @ torch.diag(t) @ V.t()
    got = subspace.chebyshev(G, X, X @ G, d, cut)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_subspace_iteration_converges_in_a_few_filters(monkeypatch):
    """A random (Marchenko-Pastur: flat-topped) layer needs few rounds, each a filter of the
    degree its worst boundary asks for; the result matches float64."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(12)) / 32
    degrees = []
    chebyshev = subspace.chebyshev
    monkeypatch.setattr(subspace, "chebyshev", lambda G, X, GX, d, c: degrees.append(d) or chebyshev(G, X, GX, d, c))
    p, s, q, est = subspace.top_triplets(w, 65, None, 0)
    assert 1 <= len(degrees) <= 4 and sum(degrees) <= 60, degrees
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for k in (1, 8, 32, 64):
        allowed = max(2e-6, 0.5 * svd.predicted_fp32_error(sv, k))
        assert rel((p[:, :k] * s[:k]) @ q[:k], (u[:, :k] * sv[:k]) @ vh[:k]) <= allowed, k


def test_filter_degree_and_gain():
    """``subspace.filter_degree``: the degree asked for by the worst bound, capped by the spread
    between the block's top and k-th directions, and log T_d(x_k) (finite for a cut near zero, where
    T_d itself overflows a float)."""
    theta = torch.tensor([4.0, 3.5, 3.2], dtype=torch.float64)
    degree, log_gain = subspace.filter_degree(theta, 2, 1e4)
    a_k = math.acosh(2 * 3.5 / 3.2 - 1)
    assert degree == math.ceil(math.log(1e5) / a_k)
    assert math.isclose(log_gain, math.log(math.cosh(degree * a_k)), rel_tol=1e-12)
    steep = torch.tensor([1e6, 1.0, 0.5], dtype=torch.float64)  # the top would outgrow the k-th
    assert subspace.filter_degree(steep, 2, 1e4)[0] == 2
    degree, log_gain = subspace.filter_degree(torch.tensor([1.0, 0.5, 1e-300], dtype=torch.float64), 2, 1e4)
    assert degree >= 2 and math.isfinite(log_gain) and log_gain > 600
    flat = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64)
    assert subspace.filter_degree(flat, 2, 1e4) is None  # k-th not above the cut


def test_subspace_iteration_gives_up_on_a_rank_deficient_layer():
    """Fewer nonzero singular values than the block: nothing above the cut to amplify, so it
    reports no result and ``base_terms`` goes dense, exact."""
    w = spectrum_matrix(900, 800, [3.0, 2.0, 1.0] + [0.5] * 60)
    assert subspace.top_triplets(w, 65, None, 0) is None
    t = svd.base_terms(w, 64, method="subspace")
    assert t.method.startswith("dense")
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert rel(prefix_products(t.p, t.lam, t.q, 3), (u[:, :3] * sv[:3]) @ vh[:3]) <= 2e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["dense", "lanczos", "subspace"])
def test_random_weights_match_or_are_flagged(method, device):
    """Random (Marchenko-Pastur) weights: boundaries either match lycoris to 1e-5 or are flagged."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(5)) / 16
    r = 32
    mod = lycoris_module(w, r)
    t = svd.base_terms(w, r, method=method, device=device)
    mismatched = []
    for k in range(1, r + 1):
        err = rel(prefix_products(t.p, t.lam, t.q, k), prefix_products(mod.base_p, mod.base_lambda, mod.base_q, k))
        if err > TOL:
            mismatched.append(k)
    assert set(mismatched) <= set(t.ill_conditioned), (mismatched, t.ill_conditioned)


def test_near_coincident_singular_values_are_flagged():
    s = [3.0, 2.5, 2.0, 1.6, 1.3, 1.3 * (1 - 1e-7), 0.9, 0.7, 0.5]
    w = spectrum_matrix(120, 90, s)
    t = svd.base_terms(w, 8)
    assert 5 in t.ill_conditioned  # s5 ~= s6: the top-5 split is ill-defined
    assert 4 not in t.ill_conditioned and 6 not in t.ill_conditioned
    # the ill-defined split still gives the right *union* of the two directions
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert rel(prefix_products(t.p, t.lam, t.q, 6), (u[:, :6] * sv[:6]) @ vh[:6]) < 1e-6


def test_flagging_rule_is_the_fp32_perturbation_bound():
    s = torch.tensor([1.0, 0.5, 0.5 - 1e-3, 0.1], dtype=torch.float64)
    # k=1: gap 0.5; k=3: gap 0.4: far above eps32-level; k=2: gap 1e-3 of s1: ~1e-4 error expected
    assert svd.ill_conditioned_boundaries(s, 3) == [2]
    bound = accuracy.EPS32 * 1.0 * 0.5 / (1e-3 * float(torch.tensor([1.0, 0.5]).norm()))
    assert svd.predicted_fp32_error(s, 2) == pytest.approx(accuracy.FP32_SVD_FLOOR + accuracy.FP32_SVD_C * bound)


def test_flagging_is_calibrated_against_fp32_svds():
    """No unflagged boundary where torch's fp32 SVD (what lycoris ran) misses a float64 SVD by more
    than the tolerance: random and separated spectra."""
    for w in (torch.randn(300, 280, generator=torch.Generator().manual_seed(11)) / 17, decaying(300, 280, 0.95, seed=4)):
        u64, s64, vh64 = torch.linalg.svd(w.double(), full_matrices=False)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        flagged = svd.ill_conditioned_boundaries(s64[:33], 32)
        for k in range(1, 33):
            err = rel(prefix_products(u, s, vh, k), (u64[:, :k] * s64[:k]) @ vh64[:k])
            assert err <= TOL or k in flagged, (k, err)


def test_rank_beyond_matrix_is_padded_like_lycoris():
    w = decaying(6, 10, decay=0.7)
    mod = lycoris_module(w, 8)
    t = svd.base_terms(w, 8)
    assert t.p.shape == (6, 8) and t.q.shape == (8, 10)
    assert torch.allclose(t.lam[6:], mod.base_lambda.reshape(-1)[6:])
    for k in range(1, 9):
        ref = prefix_products(mod.base_p, mod.base_lambda, mod.base_q, k)
        assert rel(prefix_products(t.p, t.lam, t.q, k), ref) <= TOL


@pytest.mark.parametrize("sig_type", ["last", "middle"])
def test_other_sig_types_match_lycoris(sig_type):
    w = decaying(40, 30, decay=0.85)
    mod = lycoris_module(w, 6, sig_type)
    t = svd.base_terms(w, 6, sig_type)
    full_ref = prefix_products(mod.base_p, mod.base_lambda, mod.base_q, 6)
    assert rel(prefix_products(t.p, t.lam, t.q, 6), full_ref) <= TOL


def test_half_precision_weight_is_read_as_fp32():
    """lycoris takes the SVD of ``weight.float()``: a bf16 base gives the SVD of its exact fp32 values."""
    w = decaying(128, 96).to(torch.bfloat16)
    t = svd.base_terms(w, 8)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert rel(prefix_products(t.p, t.lam, t.q, 8), (u[:, :8] * s[:8]) @ vh[:8]) < 1e-6


def test_weight_is_converted_once_or_in_chunks(monkeypatch):
    """Peak extra memory ~ one fp32 weight: a bf16 weight gets at most one whole fp32 copy (Lanczos'
    products), and its float64 conversions (the certification) go a row-chunk at a time."""
    w = decaying(2048, 128).to(torch.bfloat16)
    monkeypatch.setattr(products, "CHUNK_ELEMS", 128 * 256)
    copies = []  # (dtype, elements) of every converted copy, made by conversion or into a buffer
    for name in ("to", "float", "double"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, **k):
            out = _orig(self, *a, **k)
            if isinstance(out, torch.Tensor) and out.data_ptr() != self.data_ptr():
                copies.append((out.dtype, out.numel()))
            return out

        monkeypatch.setattr(torch.Tensor, name, spy)
    orig_copy = torch.Tensor.copy_

    def copy_spy(self, src, *a, **k):
        if isinstance(src, torch.Tensor) and src.dtype != self.dtype:
            copies.append((self.dtype, src.numel()))
        return orig_copy(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_spy)
    t = svd.base_terms(w, 8, method="lanczos")
    monkeypatch.undo()
    whole = [(d, n) for d, n in copies if n >= w.numel()]
    assert whole == [(torch.float32, w.numel())], whole
    assert max(n for d, n in copies if d == torch.float64) <= 128 * 256
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert rel(prefix_products(t.p, t.lam, t.q, 8), (u[:, :8] * s[:8]) @ vh[:8]) < 2e-6


@pytest.mark.parametrize("wide", [False, True])
def test_row_chunks_convert_either_layout_exactly(monkeypatch, wide):
    """Streamed conversion of A's rows, for A = W (tall) and A = W^T (a wide weight, read a block
    of W's columns at a time): every row exactly once, exactly converted, in buffers of the chunk
    size."""
    monkeypatch.setattr(products, "CHUNK_ELEMS", 40 * 7)
    w = torch.randn(96, 40, generator=torch.Generator().manual_seed(6))
    A = w.t().contiguous().t() if wide else w  # same values; A = W^T with W row-major when wide
    assert (A.stride(0) == 1) == wide
    seen = torch.zeros(96, dtype=torch.int64)
    for rows, chunk in products.row_chunks(A, torch.float64):
        assert chunk.dtype == torch.float64 and chunk.shape == (rows.stop - rows.start, 40)
        assert rows.stop - rows.start <= 7
        assert torch.equal(chunk, w[rows].double())
        seen[rows] += 1
    assert bool((seen == 1).all())


def test_steep_spectrum_with_a_close_tail_stays_exact():
    """Small wanted singular values (s_33 ~ 3% of s_1) just above the rest: beyond what an fp32 Gram
    matrix resolves. The error bound must notice, and the result must still be exact (float64
    refinement or the dense fallback)."""
    n, r = 400, 32
    top = 2 * 0.9 ** torch.arange(r + 1, dtype=torch.float64)
    tail = torch.linalg.svdvals(torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    s = tail / tail[0] * top[-1] * 0.95
    s[: r + 1] = top
    w = spectrum_matrix(n, n, s, seed=9)
    t = svd.base_terms(w, r, method="lanczos")
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for k in range(1, r + 1):
        assert rel(prefix_products(t.p, t.lam, t.q, k), (u[:, :k] * sv[:k]) @ vh[:k]) <= 3e-6, (k, t.method)
    assert t.est_error <= 3e-6


def test_scipy_blas_runs_on_one_thread_inside_the_ritz_checks(monkeypatch):
    """SciPy's OpenBLAS workers spin after each call and take a core from torch's products; the
    checks' ``eigh`` runs with that BLAS limited to one thread, and the limit is lifted after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.linalg

    def blas_threads():
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

    seen, orig = [], scipy.linalg.eigh

    def spy(*a, **k):
        seen.append(blas_threads())
        return orig(*a, **k)

    monkeypatch.setattr(scipy.linalg, "eigh", spy)
    before = blas_threads()
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        h = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        theta, _ = lanczos.top_eigh(h + h.t(), 3)
        inside_after = blas_threads()
    assert seen == [{1}]
    assert inside_after == {2}
    assert blas_threads() == before
    assert torch.allclose(theta, torch.linalg.eigvalsh(h + h.t()).flip(0)[:3])


def test_next_check_is_placed_where_the_accelerating_bound_meets_the_targets():
    """After three failed checks the next one goes where a parabola through them (log10 of bound /
    target against Krylov size) reaches a 2x margin: whole blocks, at least one, at most 1/3 more."""
    np = pytest.importorskip("numpy")
    b, misses = 16, [(352, 4.28), (464, 3.78), (608, 2.22)]  # a random 3072-wide layer (measured)
    grow = (608 // lanczos.CHECK_GROWTH) // b * b
    assert lanczos.next_check_in(misses[:2], 608, b) == grow  # too few points: geometric growth
    step = lanczos.next_check_in(misses, 608, b)
    assert step % b == 0 and b <= step < grow
    fit = np.poly1d(np.polyfit([x for x, _ in misses], [y for _, y in misses], 2))
    assert fit(608 + step) <= math.log10(0.5) < fit(608 + step - b)
    assert lanczos.next_check_in([(352, 2.0), (464, 2.5), (608, 3.0)], 608, b) == grow  # not converging
    assert lanczos.next_check_in([(352, math.inf), (464, math.inf), (608, math.inf)], 608, b) == grow


@pytest.mark.parametrize("case", ["random square", "random tall", "random tall, shift-invert", "random wide",
                                  "decaying"])
@pytest.mark.parametrize("device", DEVICES)
def test_error_estimate_bounds_the_true_error_at_every_boundary(case, device):
    """Lanczos' certified estimate of each boundary's product error decides when it stops and which
    boundaries are flagged: it must not be below the true error (against a float64 SVD)."""
    g = torch.Generator().manual_seed(3)
    w = {"random square": lambda: (torch.rand(768, 768, generator=g) * 2 - 1) / 28,
         "random tall": lambda: (torch.rand(1536, 384, generator=g) * 2 - 1) / 20,
         "random tall, shift-invert": lambda: (torch.rand(1536, 384, generator=g) * 2 - 1) / 20,
         "random wide": lambda: (torch.rand(384, 1536, generator=g) * 2 - 1) / 20,
         "decaying": lambda: decaying(768, 768)}[case]()
    k = 33
    p, s, q, est = (t.cpu() for t in lanczos.top_triplets(w, k, torch.device(device), 0,
                                                      shift_invert=True if "shift" in case else None))
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for j in range(1, k):
        err = rel(prefix_products(p, s, q, j), (u[:, :j] * sv[:j]) @ vh[:j])
        # below ~1e-13 both sides are the float64 comparison's own rounding (seen on a GPU: 2.3e-15
        # against a bound of 1.1e-15 at a steep spectrum's first boundary)
        assert err <= float(est[j - 1]) + 1e-13, (j, err, float(est[j - 1]))


def test_float32_checks_only_measure_the_distance_float64_decides(monkeypatch):
    """A check after a miss by >1000x runs its eigh in float32 (2x faster): it only has to say how
    far the Ritz pairs still are. Stopping is always decided in float64: the first and the final
    check are float64, and a float32 check that looks converged is redone in float64 at once."""
    calls, orig = [], lanczos.top_eigh

    def spy(h, n, rough=False):
        calls.append((h.shape[0], rough))
        return orig(h, n, rough)

    monkeypatch.setattr(lanczos, "top_eigh", spy)
    g = torch.Generator().manual_seed(3)
    torch.rand(1024, 1024, generator=g)
    w = (torch.rand(1536, 1536, generator=g) * 2 - 1) / 1536 ** 0.5
    p, s, q, est = lanczos.top_triplets(w, 65, None, 0)
    assert calls[0][1] is False and calls[-1][1] is False
    assert any(rough for _, rough in calls)
    assert calls[-2:] == [(calls[-1][0], True), (calls[-1][0], False)]  # a rough pass, confirmed
    assert bool((est <= accuracy.targets(s.cpu(), 65)).all())


def _shift_invert_spy(monkeypatch):
    made, orig = [], lanczos.ShiftInvert.above.__func__

    def spy(cls, *a, **kw):
        out = orig(cls, *a, **kw)
        made.append(out)
        return out

    monkeypatch.setattr(lanczos.ShiftInvert, "above", classmethod(spy))
    return made


def test_a_flat_topped_gram_restarts_on_its_shifted_inverse(monkeypatch):
    """A tall random layer (flat top: s_k ~ s_1) is far from converged at the first check: Lanczos
    restarts on (sigma I - G)^-1. Its residuals, turned into G's, must stop it where the float64
    certification agrees (no refinement pass), and the result must be exact against a float64 SVD.
    A decaying spectrum keeps plain products with G."""
    made = _shift_invert_spy(monkeypatch)
    passes, orig_times = [], products.times_both_rows
    monkeypatch.setattr(products, "times_both_rows", lambda A, Q: passes.append(1) or orig_times(A, Q))
    sizes, orig_eigh = [], lanczos.top_eigh
    monkeypatch.setattr(lanczos, "top_eigh",
                        lambda h, n, rough=False: sizes.append(h.shape[0]) or orig_eigh(h, n, rough))
    g = torch.Generator().manual_seed(5)
    w = (torch.rand(4096, 1024, generator=g) * 2 - 1) / 64
    k = 33
    lanczos.top_triplets(w, k, None, 0, shift_invert=False)
    plain_size = sizes[-1]
    p, s, q, est = lanczos.top_triplets(w, k, None, 0)
    assert len(made) == 1 and made[0] is not None and len(passes) == 2
    assert sizes[-1] <= 0.6 * plain_size  # the point of it: far fewer Krylov vectors (measured 256 / 528)
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert made[0].sigma > float(sv[0]) ** 2  # above G's top (Cholesky proved it)
    assert bool((est <= accuracy.targets(s.cpu(), k)).all())
    for j in range(1, k):
        assert rel(prefix_products(p, s, q, j), (u[:, :j] * sv[:j]) @ vh[:j]) <= float(est[j - 1]), j

    made.clear()
    lanczos.top_triplets(decaying(4096, 1024, decay=0.99), k, None, 0)
    assert made == []


def test_a_failed_factorisation_restarts_plain_once(monkeypatch):
    """Where no sigma above the top is found (here: the top estimate handed over is a quarter of
    the truth, so every Cholesky fails), Lanczos restarts with plain products, once, and is exact."""
    calls, orig = [], lanczos.ShiftInvert.above.__func__

    def low_top(cls, G, top, res, **kw):
        out = orig(cls, G, top / 4, 0.0, **kw)
        calls.append(out)
        return out

    monkeypatch.setattr(lanczos.ShiftInvert, "above", classmethod(low_top))
    g = torch.Generator().manual_seed(5)
    w = (torch.rand(4096, 1024, generator=g) * 2 - 1) / 64
    k = 33
    p, s, q, est = lanczos.top_triplets(w, k, None, 0)
    assert calls == [None]
    assert bool((est <= accuracy.targets(s.cpu(), k)).all())
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for j in range(1, k):
        assert rel(prefix_products(p, s, q, j), (u[:, :j] * sv[:j]) @ vh[:j]) <= float(est[j - 1]), j


def test_shift_invert_operator_against_dense_float64():
    """``lanczos.ShiftInvert``: sigma above G's top eigenvalue, ``solve`` inverts sigma I - G, ``eigen``
    gives G's Ritz values and residual norms; all against float64 dense algebra."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(600, 200, generator=g) / 600 ** 0.5
    G = A.t() @ A
    Gd = G.double()
    lam = torch.linalg.eigvalsh(Gd)
    op = lanczos.ShiftInvert.above(G, 0.999 * float(lam[-1]), 0.0)
    assert op is not None and op.sigma > float(lam[-1])
    shifted = op.sigma * torch.eye(200, dtype=torch.float64) - Gd
    X = torch.linalg.qr(torch.randn(200, 16, generator=g, dtype=torch.float64))[0].t().float()
    Y = op.solve(X)
    assert torch.allclose(Y.double() @ shifted, X.double(), atol=1e-4)
    assert rel(Y.double(), X.double() @ torch.linalg.inv(shifted)) < 1e-4

    mu = torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64) / (op.sigma - float(lam[-1]))
    C = torch.randn(16, 3, generator=g, dtype=torch.float64)
    ritz, res = op.eigen(mu, C, X)
    assert torch.allclose(ritz, op.sigma - 1 / mu)
    dense = (C.t() @ X.double() @ shifted).norm(dim=1) / mu
    assert torch.allclose(res, dense, rtol=1e-5)

    assert lanczos.ShiftInvert.above(G, 0.2 * float(lam[-1]), 0.0) is None  # cannot get above the top


@pytest.mark.parametrize("kappa", [1.0, 1e3, 1e6, 1e12])
def test_block_orthonormalisation_is_exact_to_its_dtype(monkeypatch, kappa):
    """``products.orthonormal_rows``: X = R^T Q with orthonormal rows Q, against float64 algebra; an
    fp32 block is factored once where well conditioned (kappa(X X^T) <= 1e4), twice otherwise."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(3000, 16, generator=g, dtype=torch.float64))[0]
    X = ((u * kappa ** -torch.linspace(0, 0.5, 16, dtype=torch.float64)) @ v.t()).float()
    factorisations = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: factorisations.append(1) or real(*a, **k))
    Q, R = products.orthonormal_rows(X)
    assert len(factorisations) == (1 if kappa <= products.ONE_PASS_MAX_KAPPA else 2)
    assert Q.dtype == torch.float32 and R.dtype == torch.float64
    Qd = Q.double()
    assert (Qd @ Qd.t() - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-6
    assert torch.allclose(R, R.triu())
    assert rel(R.t() @ Qd, X.double()) < 1e-6


def _plain_ata(A, X):
    return X.double() @ A.double().t() @ A.double()


X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and X86), reason="oneDNN products: x86-64 builds")
@pytest.mark.parametrize("shape", [(384, 384), (600, 384)])
def test_reordered_onednn_products_are_full_fp32(shape):
    """The products Lanczos takes with a square-ish A on an x86-64 CPU go through oneDNN's
    reordered weights (where a build has them, as here), and are as exact as fp32 products: the
    Krylov basis, and so the number of Krylov vectors and the result, depend on it."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(*shape, generator=g) / shape[0] ** 0.5
    X = torch.randn(16, shape[1], generator=g)
    packed = cpu_kernels.onednn_times_ata(A, 16)
    assert packed is not None
    assert rel(packed(X).double(), _plain_ata(A, X)) < 1e-6
    assert rel(cpu_kernels.times_ata(A, 16, copy_ok=True)(X).double(), _plain_ata(A, X)) < 1e-6


def test_other_cpus_keep_their_blas(monkeypatch):
    """The oneDNN products were measured on x86-64 only: elsewhere (an ARM CPU, whose torch.mm
    may use Accelerate or OpenBLAS) Lanczos keeps plain products, and stays exact."""
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    asked = []
    monkeypatch.setattr(cpu_kernels, "onednn_times_ata", lambda *a: asked.append(a))
    g = torch.Generator().manual_seed(4)
    A = torch.randn(600, 384, generator=g) / 600 ** 0.5
    X = torch.randn(16, 384, generator=g)
    assert rel(cpu_kernels.times_ata(A, 16, copy_ok=True)(X).double(), _plain_ata(A, X)) < 1e-6
    assert asked == []


class _ReducedPrecisionOneDNN:
    """oneDNN's ops, but its linear rounds to bf16 (as with ``fp32_precision = "bf16"``)."""

    def __init__(self, real):
        self._reorder_linear_weight = real._reorder_linear_weight
        self._real_linear = real._linear_pointwise

    def _linear_pointwise(self, *a):
        return self._real_linear(*a).bfloat16().float()


class _NoLinearOneDNN:
    """A build whose oneDNN lacks the op (it raises AttributeError like ``torch.ops`` does)."""


@pytest.mark.parametrize("ops", [_ReducedPrecisionOneDNN, _NoLinearOneDNN])
def test_inexact_or_missing_onednn_falls_back_to_plain_products(monkeypatch, request, ops):
    """Without full fp32 products from oneDNN (reduced-precision math, or no such op), Lanczos
    uses plain products, and the base terms stay exact against a float64 SVD."""
    real = torch.ops.mkldnn
    monkeypatch.setattr(torch.ops, "mkldnn", ops(real) if ops is _ReducedPrecisionOneDNN else ops())
    cpu_kernels.onednn_is_fp32.cache_clear()  # checked once per math setting: check this build again
    request.addfinalizer(cpu_kernels.onednn_is_fp32.cache_clear)
    g = torch.Generator().manual_seed(4)
    A = torch.randn(600, 384, generator=g) / 600 ** 0.5
    X = torch.randn(16, 384, generator=g)
    assert cpu_kernels.onednn_times_ata(A, 16) is None
    assert rel(cpu_kernels.times_ata(A, 16, copy_ok=True)(X).double(), _plain_ata(A, X)) < 1e-6
    p, s, q, est = lanczos.top_triplets(A, 9, None, 0)
    u, sv, vh = torch.linalg.svd(A.double(), full_matrices=False)
    for j in range(1, 9):
        assert rel(prefix_products(p, s, q, j), (u[:, :j] * sv[:j]) @ vh[:j]) <= max(float(est[j - 1]), 1e-6), j


def test_vectorised_fp32_error_prediction_is_the_per_boundary_one():
    """``predicted_fp32_errors`` (all boundaries at once) against the scalar definition, including
    a tie (infinite) and a spectrum shorter than the boundaries asked for."""
    s = torch.tensor([3.0, 2.5, 2.5, 1.0, 0.5], dtype=torch.float64)
    got = svd.predicted_fp32_errors(s, 7)
    assert got.shape == (5,)
    for k in range(1, 6):
        want = svd.predicted_fp32_error(s, k)
        assert (math.isinf(want) and math.isinf(got[k - 1])) or math.isclose(float(got[k - 1]), want, rel_tol=1e-12), k
