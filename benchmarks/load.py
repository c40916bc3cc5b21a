"""First-load time of a LyCORIS T-LoRA, side by side with a full fp32 SVD per layer (`make bench`).

LyCORIS ``tlora`` files do not store their base terms: loading one means rebuilding the top-r
singular triplets of every adapted base weight. The existing ComfyUI T-LoRA pack (and lycoris-lora
itself) takes a full ``torch.linalg.svd`` of each layer. In one process, on the Flux-like model at
real width (``tiny_flux(hidden_size=3072, num_heads=24)``: 1 double + 1 single block, float32,
seeded random weights: a Marchenko-Pastur spectrum, the hardest case for a partial SVD) with a
10-module rank-64 T-LoRA in lycoris' key layout (8 square 3072x3072 layers, 6 of them slices of a
fused qkv / linear1, and the two 12288-wide MLP layers of the double block):

  baseline     torch.linalg.svd(W.float(), full_matrices=False) of every mapped weight (slice);
  first load   read_tlora + comfy_glue.binding.bind_tlora with an empty cache (key mapping, dequantize,
               the pack's top-r SVD, cache write): the mean of three, run before, between and
               after the two halves of the baseline (a drift of this shared machine's speed then
               weighs on both sides alike);
  reload       the same with the cache filled (each load hashes the weights again: ComfyUI's
               inference-mode weights have no version counter to memoise a hash on).

Exactness: for every module and every prefix mask k = 1..64, the rebuilt P0 diag(lambda0 m) Q0 is
compared with the baseline's (= lycoris-lora's own reconstruction); boundaries whose split is
ill-defined at fp32 (flagged by the pack) are counted apart. Peak extra memory (RSS, sampled every
5 ms) is taken in another first load, apart from the timed one.
``--device cuda``: the model's load device is the GPU, where the pack computes (the weight's copy
there included) and so does the baseline; peak extra GPU memory is reported too.
Prints a JSON summary, then as its LAST line ``first_load_speedup_vs_full_svd=X.X``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit import host  # noqa: E402

MODULES = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
    "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v",
]


class PeakRSS:
    """Peak resident memory above a starting level, sampled every 5 ms in a thread."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _release_free_heap():
    """glibc's ``malloc_trim(0)``: return freed heap pages to the OS (no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _separated_slice(model, target, R):
    """A copy of the target's weight (slice) as U diag(s) V^T with a trained-like top: s_1..s_{R+1}
    decaying geometrically (7% steps), the original (random) spectrum scaled under them."""
    import torch

    from devkit.tlora_files import layer_weight

    w = layer_weight(model, *target).double()
    gen = torch.Generator().manual_seed(7)
    o, i = w.shape
    u = torch.linalg.qr(torch.randn(o, o, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0]
    top = 2.0 * 0.93 ** torch.arange(R + 1, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    s = s / s[0] * top[-1] * 0.93
    s[: R + 1] = top
    return ((u[:, : s.numel()] * s) @ v[:, : s.numel()].t()).float()


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--modules", type=int, default=len(MODULES), help="use the first N modules")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="the model's load device: where both the pack and the baseline compute")
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    host.load_comfy(cpu=args.device == "cpu")
    import comfy.model_management as mm

    dev = mm.get_torch_device()
    if dev.type != args.device:
        raise SystemExit(f"--device {args.device}: ComfyUI's device is {dev}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    from devkit.tiny_models import tiny_flux
    from devkit.tlora_files import diffusers_targets, layer_weight

    formats = host.pack_module("tlora_core.formats")
    keymap = host.pack_module("comfy_glue.binding")
    svd = host.pack_module("tlora_core.svd")

    t0 = time.perf_counter()
    model = tiny_flux(seed=0, hidden_size=args.hidden, num_heads=args.heads)
    build_s = time.perf_counter() - t0
    targets = diffusers_targets(model)
    modules = MODULES[: args.modules]
    R = args.rank

    # a LyCORIS tlora file (lycoris-lora's key layout + SimpleTuner's lycoris_config metadata)
    gen = torch.Generator().manual_seed(1)
    sd, shapes = {}, {}
    for path in modules:
        o, i = layer_weight(model, *targets[path]).shape
        shapes[path] = (o, i)
        name = "lycoris_" + path.replace(".", "_")
        sd[f"{name}.q_layer.weight"] = torch.randn(R, i, generator=gen) / i ** 0.5
        sd[f"{name}.p_layer.weight"] = torch.randn(o, R, generator=gen) / R ** 0.5
        sd[f"{name}.lambda_layer"] = torch.rand(1, R, generator=gen) + 0.5
        sd[f"{name}.alpha"] = torch.tensor(float(R))
    work = Path(tempfile.mkdtemp(prefix="tlora-bench-"))
    lora = work / "bench_tlora.safetensors"
    save_file(sd, str(lora), {"lycoris_config": json.dumps({"algo": "tlora", "linear_dim": R, "linear_alpha": R,
                                                             "tlora_min_rank": 1, "tlora_alpha": 1.0})})

    # the pack's loads, with base_terms timed per call (the SVD's share of a load, by shape)
    cache = work / "cache"
    per_call = []
    real_base_terms = svd.base_terms

    def timed_base_terms(w, *a, **k):
        t = time.perf_counter()
        out = real_base_terms(w, *a, **k)
        per_call.append((str(tuple(w.shape)), time.perf_counter() - t))
        return out

    def load():
        f = formats.read_tlora(lora)
        return f, keymap.bind_tlora(model, f, cache_dir=str(cache), progress=False)

    def full_svd(w):
        """The baseline on the load device, the weight's copy there included (as in the pack's load)."""
        out = torch.linalg.svd(w.to(dev), full_matrices=False)
        sync()
        return out

    if dev.type == "cuda":  # library loads and handle creation stay out of both timings
        warm = torch.randn(1024, 1024, generator=gen)
        full_svd(warm)
        svd.base_terms(warm, R, method="lanczos", device=dev)

    first_runs = []  # (wall, cpu, per-call times, bound) of every first load

    def first_load():
        """Empty cache and no in-memory fingerprints: a first load, as in a fresh ComfyUI."""
        shutil.rmtree(cache, ignore_errors=True)
        per_call.clear()
        (_, bound), wall, cpu = timed(load)
        first_runs.append((wall, cpu, list(per_call), bound))

    # baseline: a full fp32 SVD of every mapped weight (slice), as lycoris-lora / the existing pack
    # do. It runs in two halves between three first loads, so that a drift in this shared machine's
    # speed weighs on both sides alike; the first load is the mean of the three.
    baseline, base_wall, base_cpu = {}, 0.0, 0.0
    per_shape = {}
    half = (len(modules) + 1) // 2
    svd.base_terms = timed_base_terms
    try:
        for part in (modules[:half], modules[half:], None):
            first_load()
            for path in part or ():
                w = layer_weight(model, *targets[path]).float()
                (u, s, vh), dw, dc = timed(lambda: full_svd(w))
                baseline[path] = (u[:, :R].cpu(), s[:R].cpu(), vh[:R].cpu())
                del u, s, vh
                base_wall += dw
                base_cpu += dc
                per_shape.setdefault(str(shapes[path]), {"n": 0, "full_svd_s": 0.0})
                per_shape[str(shapes[path])]["n"] += 1
                per_shape[str(shapes[path])]["full_svd_s"] += dw
        # reload: the cache filled
        (_, bound2), reload_wall, _ = timed(load)
        # peak memory of a first load, in a run of its own: the sampling thread costs ~4% of the time;
        # freed heap pages go back to the OS first, so that the run's own peak shows in its RSS
        shutil.rmtree(cache)
        _release_free_heap()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            gpu_start = torch.cuda.memory_allocated()
        with PeakRSS() as mem:
            load()
        gpu_extra = torch.cuda.max_memory_allocated() - gpu_start if dev.type == "cuda" else None
    finally:
        svd.base_terms = real_base_terms
    n_runs = len(first_runs)
    first_wall = sum(r[0] for r in first_runs) / n_runs
    first_cpu = sum(r[1] for r in first_runs) / n_runs
    bound = first_runs[0][3]
    for _, _, calls, _ in first_runs:
        for shape, dt in calls:
            per_shape[shape]["pack_svd_s"] = per_shape[shape].get("pack_svd_s", 0.0) + dt / n_runs

    # exactness against the baseline (= lycoris-lora's own fp32 reconstruction), every prefix mask
    max_err_ok, flagged, mismatched_unflagged, compared = 0.0, 0, 0, 0
    methods = set()
    for path in modules:
        name = "lycoris_" + path.replace(".", "_")
        t = bound.base_terms[name]
        methods.add(t.method)
        u, s, vh = baseline[path]
        for k in range(1, R + 1):
            ref = (u[:, :k].double() * s[:k].double()) @ vh[:k].double()
            got = (t.p[:, :k].double() * t.lam[:k].double()) @ t.q[:k].double()
            err = ((got - ref).norm() / ref.norm()).item()
            compared += 1
            if k in t.ill_conditioned:
                flagged += 1
            else:
                max_err_ok = max(max_err_ok, err)
                mismatched_unflagged += err > svd.REPRODUCIBLE_TOL
    same_reload = all(torch.equal(a.adapter.up, b.adapter.up) and torch.equal(a.adapter.down, b.adapter.down)
                      for a, b in zip(bound.targets, bound2.targets))
    same_first = all(torch.equal(a.adapter.up, b.adapter.up) and torch.equal(a.adapter.down, b.adapter.down)
                     for r in first_runs[1:] for a, b in zip(bound.targets, r[3].targets))

    # exactness at real width where every boundary is well defined: a 3072x3072 slice (img q of the
    # fused qkv) given 65 separated top singular values (1.4% of s1 apart) above a random tail
    sep = _separated_slice(model, targets[modules[0]], R)
    (su, ss, svh), sep_full_s, _ = timed(lambda: full_svd(sep))
    su, ss, svh = su[:, :R].cpu(), ss[:R].cpu(), svh[:R].cpu()
    st, sep_pack_s, _ = timed(lambda: svd.base_terms(sep, R, device=dev))
    # the reference is lycoris-lora on a CPU (LAPACK's fp32 SVD). On a GPU torch's default fp32 SVD
    # (cuSOLVER's Jacobi gesvdj) is far less exact: how far is reported apart
    device_svd = (su, ss, svh)
    if dev.type != "cpu":
        su, ss, svh = torch.linalg.svd(sep, full_matrices=False)

    def prefix(u, s, vh, k):
        return (u[:, :k].double() * s[:k].double()) @ vh[:k].double()

    sep_errs, device_svd_errs = {}, {}
    for k in range(1, R + 1):
        ref = prefix(su, ss, svh, k)
        sep_errs[k] = ((prefix(st.p, st.lam, st.q, k) - ref).norm() / ref.norm()).item()
        device_svd_errs[k] = ((prefix(*device_svd, k) - ref).norm() / ref.norm()).item()
    sep_ok = [k for k in sep_errs if k not in st.ill_conditioned]
    largest_weight = max(o * i for o, i in shapes.values()) * 4

    speedup = base_wall / first_wall
    summary = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "model": f"tiny_flux(hidden_size={args.hidden}, num_heads={args.heads}) fp32, built in {build_s:.1f}s",
        "modules": len(modules),
        "rank": R,
        "shapes": {k: v["n"] for k, v in per_shape.items()},
        "baseline_full_svd_s": round(base_wall, 2),
        "baseline_full_svd_cpu_s": round(base_cpu, 2),
        "baseline_full_svd_s_by_shape": {k: round(v["full_svd_s"], 2) for k, v in per_shape.items()},
        "first_load_s": round(first_wall, 2),
        "first_load_runs_s": [round(r[0], 2) for r in first_runs],
        "first_load_cpu_s": round(first_cpu, 2),
        "first_loads_identical": same_first,
        "reload_s": round(reload_wall, 3),
        "reload_identical": same_reload,
        "pack_svd_s_by_shape": {k: round(v.get("pack_svd_s", 0.0), 2) for k, v in per_shape.items()},
        "separated_spectrum_slice": {
            "full_svd_s": round(sep_full_s, 2), "pack_svd_s": round(sep_pack_s, 2),
            "speedup": round(sep_full_s / sep_pack_s, 1),
            "unflagged_prefixes": len(sep_ok), "flagged": len(st.ill_conditioned), "method": st.method,
            "max_rel_err_unflagged": max((sep_errs[k] for k in sep_ok), default=0.0),
            "max_rel_err_flagged": max((sep_errs[k] for k in st.ill_conditioned), default=0.0),
            **({} if dev.type == "cpu" else {
                "device_default_fp32_svd_max_rel_err_unflagged": max((device_svd_errs[k] for k in sep_ok), default=0.0)})},
        "svd_methods": sorted(methods),
        "peak_extra_rss_mb": round(mem.extra / 2**20, 1),
        "largest_weight_mb": round(largest_weight / 2**20, 1),
        "peak_extra_rss_in_largest_weights": round(mem.extra / largest_weight, 2),
        **({} if gpu_extra is None else {
            "peak_extra_gpu_mb": round(gpu_extra / 2**20, 1),
            "peak_extra_gpu_in_largest_weights": round(gpu_extra / largest_weight, 2)}),
        "prefix_masks_compared": compared,
        "prefix_masks_flagged_ill_conditioned": flagged,
        "max_rel_err_unflagged": max_err_ok,
        "unflagged_above_1e-5": mismatched_unflagged,
        "notes": bound.notes,
        "first_load_speedup_vs_full_svd_cpu_time": round(base_cpu / first_cpu, 1),
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    print(f"first_load_speedup_vs_full_svd={speedup:.1f}")


if __name__ == "__main__":
    main()
