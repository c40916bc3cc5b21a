"""The top singular triplets of a base weight: LyCORIS ``tlora``'s frozen base terms, rebuilt fast.

LyCORIS files do not store their base terms ``P0 diag(lambda0) Q0``: they are the top-r singular
triplets of the adapted base weight W (fp32, ``sig_type="principal"``), which lycoris-lora took
with a full ``torch.linalg.svd``. A full SVD of every layer is the slow part of loading such a
file, and only r (<= 128 or so) of its thousands of triplets are used. Here only those are
computed, by one of three methods (``base_terms`` chooses by size and device):

- ``dense`` (``dense.py``): the Gram matrix of the smaller side in float64 and ``eigh``; exact to
  float64 and the fastest for small layers (tests, tiny models), and the fallback of the others.
- ``subspace`` (``subspace.py``, the GPU's choice past GPU_DENSE_MAX): Chebyshev-filtered subspace
  iteration on that float64 Gram matrix: a block of ~2r vectors, a few dozen float64 products with
  the Gram matrix and one small ``eigh`` per filter, then the float64 certification below. A GPU
  runs such products at tens of TFLOPS while its full ``eigh`` is latency-bound.
- ``lanczos`` (``lanczos.py``, the CPU's choice past DENSE_MAX): block Lanczos (full
  reorthogonalisation) on W^T W in fp32 (products with W itself, or with its Gram matrix for a
  tall W), which searches the whole Krylov space rather than one block. The extra memory is about
  one fp32 weight (on an x86-64 CPU a square-ish layer's products use two oneDNN-reordered copies
  of it, faster than MKL's thin products there: ``cpu_kernels.py``). A random (Marchenko-Pastur)
  layer, the hardest case, needs ~770 Krylov vectors for r = 64 at width 3072, a trained-like one
  far fewer; a tall one with such a flat top restarts on the Gram matrix's shifted inverse (~330
  instead of ~930).

The iterative methods stop when every boundary is as exact as the trainer's own fp32 SVD can be
there (or 1e-6), then a float64 Rayleigh-Ritz step against W itself certifies that with true
residuals (``accuracy.py``); where it cannot, the dense method takes over. Products with W are
streamed by rows (``products.py``); thread and TF32 settings are changed only around the work
that needs them (``settings.py``).

Only products are defined, not the signs of singular vectors; and where two singular values at a
mask boundary nearly coincide, the split between "active" and "inactive" base ranks is defined
only up to the trainer's fp32 rounding: ``BaseTerms.ill_conditioned`` lists those boundaries
(see ``ill_conditioned_boundaries``), for every method alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import dense, lanczos, settings, subspace
from .accuracy import REPRODUCIBLE_TOL, ill_conditioned_boundaries, predicted_fp32_error, predicted_fp32_errors

__all__ = ["BaseTerms", "base_terms", "REPRODUCIBLE_TOL", "predicted_fp32_error", "predicted_fp32_errors",
           "ill_conditioned_boundaries"]

DENSE_OWN_ERROR = 3e-7  # measured vs float64 SVDs (products of the fp32 output)
# a bound of the iterative methods above both this and the trainer's own fp32 rounding there
# falls back to the dense float64 method
MAX_ERROR = 1e-5
DENSE_MAX = 768  # smaller side at or below this: dense float64 (fast enough, exact)
# the same on a GPU: up to here dense is still as fast as subspace iteration (its full, latency-bound
# eigh only falls behind the filters' products on wider layers)
GPU_DENSE_MAX = 2048


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
        p, lam, q = dense.sig_type_triplets(weight, r, sig_type, device)
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
            p, s, q = dense.top_triplets(weight, k_need, device)
            own = [DENSE_OWN_ERROR] * r
        elif method in ("lanczos", "subspace"):
            found = None
            with settings.ieee_fp32():
                if method == "lanczos":
                    found = lanczos.top_triplets(weight, k_need, device, seed)
                else:
                    found = subspace.top_triplets(weight, k_need, device, seed)
            if found is not None:
                p, s, q, est_k = found
                own = [max(float(e), DENSE_OWN_ERROR) for e in est_k[:r]] + [DENSE_OWN_ERROR] * (r - est_k.numel())
                trainer = predicted_fp32_errors(s, r).tolist()
            if found is None or any(e > max(MAX_ERROR, t) for e, t in zip(own, trainer)):
                # not as exact as the trainer's own rounding somewhere (pathological spectrum)
                p, s, q = dense.top_triplets(weight, k_need, device)
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
