"""Sampling overhead of the T-LoRA runtime, side by side with ComfyUI's merged LoRA (`make bench`).

One process, three clones of one model, sampled alternately (rotating order), 1 warm-up round then
the median of N steady-state rounds:
  base    the Flux-like model at real width (tiny_flux(hidden_size=3072, num_heads=24): 1 double +
          1 single block, float32), latent 1x16x16x16, 4 euler steps, CFG with a negative cond;
  merged  + a plain rank-64 LoRA on the attention/MLP layers, merged by ComfyUI's own loader;
  tlora   + the pack's rank-64 T-LoRA on the same layers (schedule alpha 1, min_rank 1).
All three run on the same weight memory: ComfyUI merges the LoRA into it in place when the merged
clone is loaded and restores it when another clone is; each run's clone is loaded, then the
machine left to settle (``--settle``), before its timer starts. (Separate copies of identical
weights ran up to 12% apart, steadily within a process: where the memory lies, not what is
computed, would decide the ratio.)
Prints a JSON summary, then as its LAST line ``overhead_vs_merged_lora=X.XXX`` (median tlora /
median merged). The FLOP floor of the unmerged adapter is computed from the actual calls.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit import host  # noqa: E402

# the attention and MLP layers of one double and one single block (diffusers names; ComfyUI's key
# map turns q/k/v and proj_mlp into slices of the fused qkv / linear1)
LAYERS = [
    f"transformer_blocks_0_{n}" for n in (
        "attn_to_q", "attn_to_k", "attn_to_v", "attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj",
        "attn_to_out_0", "attn_to_add_out", "ff_net_0_proj", "ff_net_2", "ff_context_net_0_proj", "ff_context_net_2")
] + [f"single_transformer_blocks_0_{n}" for n in ("attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp", "proj_out")]


def build(args):
    import torch

    import comfy.lora
    import comfy.model_management as mm
    import comfy.model_patcher

    from devkit.tiny_models import tiny_flux

    adapter = host.pack_module("tlora_core.adapter")
    base = tiny_flux(seed=0, hidden_size=args.hidden, num_heads=args.heads)

    keys = comfy.lora.model_lora_keys_unet(base.model, {})
    sd = base.model.state_dict()
    gen = torch.Generator().manual_seed(1)
    lora_sd, targets, file_bytes = {}, [], 0
    for name in LAYERS:
        target = keys["lycoris_" + name]
        key, piece = (target, None) if isinstance(target, str) else target
        out_f, in_f = sd[key].shape if piece is None else (piece[2], sd[key].shape[1])
        down = torch.randn(args.rank, in_f, generator=gen) / math.sqrt(in_f)
        up = torch.randn(out_f, args.rank, generator=gen) * 0.02
        lora_sd[f"lycoris_{name}.lora_down.weight"] = down
        lora_sd[f"lycoris_{name}.lora_up.weight"] = up
        lora_sd[f"lycoris_{name}.alpha"] = torch.tensor(float(args.rank))
        file_bytes += (down.numel() + up.numel()) * down.element_size()
        ad = adapter.plain("lycoris_" + name, up, down, 1.0)
        module = key[len("diffusion_model."):-len(".weight")]
        targets.append(adapter.BoundAdapter(module, (piece[1], piece[2]) if piece else None, ad))

    # one copy of the weights for all three: the merged clone's LoRA is merged into it in place
    shared = comfy.model_patcher.ModelPatcher(base.model, load_device=mm.get_torch_device(),
                                              offload_device=mm.unet_offload_device(), weight_inplace_update=True)
    del base, sd
    merged = shared.clone()
    merged.add_patches(comfy.lora.load_lora(lora_sd, comfy.lora.model_lora_keys_unet(merged.model, {})), 1.0)
    return shared, merged, shared.clone(), targets, file_bytes


def flop_floor(base_model, targets, sample_fn, rank):
    """(full-rank, active-rank) adapter FLOPs relative to the base model's, counted on real calls."""
    import torch

    patcher = host.pack_module("comfy_glue.patcher")
    sampling = host.pack_module("comfy_glue.timesteps")
    sched = host.pack_module("tlora_core.schedule")
    dm = base_model.model.diffusion_model
    by_module = {}
    for t in targets:
        by_module.setdefault(t.module, []).append(t.adapter)
    counts = {"base": 0.0, "full": 0.0, "active": 0.0}
    schedule = sched.Schedule(max_rank=rank)
    current = {"rank": rank}

    def linear_hook(mod, args, out):
        rows = args[0].numel() // args[0].shape[-1]
        counts["base"] += 2.0 * rows * mod.in_features * mod.out_features
        for ad in by_module.get(names.get(mod), []):
            per_rank = 2.0 * rows * (ad.in_features + ad.out_features)
            counts["full"] += per_rank * ad.rank
            counts["active"] += per_rank * current["rank"]

    def attn_hook(mod, args, out):  # q @ k^T and p @ v of the attention
        q = args[0]
        b, h, L, d = q.shape if q.ndim == 4 else (q.shape[0], 1, q.shape[1], q.shape[2])
        counts["base"] += 4.0 * b * h * L * L * d

    names = {m: n for n, m in dm.named_modules()}
    handles = [m.register_forward_hook(linear_hook) for m in dm.modules() if isinstance(m, torch.nn.Linear)]

    def wrapper(apply_model, a):
        current["rank"] = sampling.active_ranks(base_model.model.model_sampling, a["timestep"], schedule)[0]
        return apply_model(a["input"], a["timestep"], **a["c"])

    import comfy.ldm.flux.math as fmath

    orig_attention = fmath.attention

    def counting_attention(q, k, v, pe, mask=None, transformer_options={}):
        attn_hook(None, (q,), None)
        return orig_attention(q, k, v, pe, mask=mask, transformer_options=transformer_options)

    probe = base_model.clone()
    probe.set_model_unet_function_wrapper(wrapper)
    fmath.attention = counting_attention
    import comfy.ldm.flux.layers as flayers
    orig_layers_attention = flayers.attention
    flayers.attention = counting_attention
    try:
        sample_fn(probe)
    finally:
        fmath.attention = orig_attention
        flayers.attention = orig_layers_attention
        for h in handles:
            h.remove()
    return counts["full"] / counts["base"], counts["active"] / counts["base"]


def runtime_share(tlora_model, sample_fn, patcher):
    """Fraction of a T-LoRA run spent in the runtime itself (rank lookup per call + the layer hooks,
    adapter matmuls included; merge mode: the weight rewrites and restores), from one instrumented
    run: a noise-robust view of the overhead on a CPU (on a GPU it also counts waits for a full
    launch queue)."""
    patch = patcher.tlora_patches(tlora_model)[0]
    merge = host.pack_module("comfy_glue.merge")
    hooks = host.pack_module("comfy_glue.hooks")
    spent = [0.0]
    add, state_for = hooks.LayerHooks._add, patch._state_for
    set_rank, restore = merge.MergedRun.set_rank, merge.MergedRun.restore

    def timed(fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return run

    hooks.LayerHooks._add = timed(add)
    patch._state_for = timed(state_for)
    merge.MergedRun.set_rank, merge.MergedRun.restore = timed(set_rank), timed(restore)
    try:
        t = time.perf_counter()
        sample_fn(tlora_model)
        total = time.perf_counter() - t
    finally:
        hooks.LayerHooks._add = add
        del patch._state_for
        merge.MergedRun.set_rank, merge.MergedRun.restore = set_rank, restore
    return spent[0] / total


def bootstrap_ratio_ci(a, b, n=2000, seed=0):
    """95% bootstrap interval of median(a) / median(b), resampling the rounds (pairs kept together)."""
    import random

    rng = random.Random(seed)
    idx = range(len(a))
    ratios = sorted(
        statistics.median(a[i] for i in pick) / statistics.median(b[i] for i in pick)
        for pick in ([rng.choice(idx) for _ in idx] for _ in range(n)))
    return [round(ratios[int(0.025 * n)], 4), round(ratios[int(0.975 * n) - 1], 4)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--runs", type=int, default=15, help="steady-state rounds (median); >= 5")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--latent", type=int, default=16,
                   help="latent height = width (16: the issue's shape, 64 tokens; 128: a 1024 px image, 4096 tokens)")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--apply", default="per-layer", choices=["per-layer", "merge"],
                   help="how the T-LoRA is applied (the Loader's 'apply' input): at each layer's output, or "
                        "merged into the weights per run (comfy_glue.merge)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait before each timed run: merging or restoring the LoRA allocates "
                        "and frees ~1.4 GB, and a VM that reports freed memory to its host does that "
                        "seconds later, inside the next run (measured: runs right after a restore were "
                        "3-10%% slower without the pause, 3 s did not suffice, 5 s did)")
    args = p.parse_args(argv)
    if args.runs < 5:
        p.error("--runs must be >= 5")

    host.load_comfy(cpu=args.device == "cpu")
    host.import_pack()
    import torch

    import comfy.model_management as mm
    import comfy.sample

    from devkit.tiny_models import flux_conditioning

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and mm.get_torch_device().type != "cuda":
        raise SystemExit("--device cuda: no CUDA device visible to ComfyUI")
    patcher = host.pack_module("comfy_glue.patcher")
    sched = host.pack_module("tlora_core.schedule")

    t0 = time.perf_counter()
    base, merged, tl_model, targets, file_bytes = build(args)
    tlora = patcher.apply_tlora(tl_model, targets, sched.Schedule(max_rank=args.rank, min_rank=1, alpha=1.0), 1.0, "bench",
                                merge=args.apply == "merge")
    build_s = time.perf_counter() - t0

    pos, neg = flux_conditioning()
    latent = torch.zeros(1, 16, args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(model):
        out = comfy.sample.sample(model, noise, args.steps, 3.5, "euler", "simple", pos, neg, latent,
                                  disable_pbar=True, seed=0)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out

    variants = {"base": base, "merged_lora": merged, "tlora": tlora}
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}  # process CPU time: less sensitive to other processes on a shared box
    outputs, repeats_exactly = {}, True
    order = list(variants)
    for i in range(args.warmup + args.runs):
        for name in order[i % 3:] + order[:i % 3]:  # rotate who goes first
            mm.load_models_gpu([variants[name]])  # merge / restore the LoRA in place, untimed
            if args.device == "cuda":
                torch.cuda.synchronize()  # that work is queued asynchronously: none of it in the timed run
            time.sleep(args.settle)  # the same pause before every run (see --settle)
            gc.collect()  # no collection of the previous run's garbage inside a timed run
            gc.disable()
            try:
                t, c = time.perf_counter(), time.process_time()
                out = sample(variants[name])
                dt, dc = time.perf_counter() - t, time.process_time() - c
            finally:
                gc.enable()
            # the in-place merge and restore leave each clone's result exactly as in its first run
            repeats_exactly &= name not in outputs or torch.equal(out, outputs[name])
            outputs.setdefault(name, out)
            if i >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
        if i >= args.warmup:
            print(f"round {i}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), file=sys.stderr)

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    floor_full, floor_active = flop_floor(base, targets, sample, args.rank)
    share = runtime_share(tlora, sample, patcher)
    patch = patcher.tlora_patches(tlora)[0]
    copies = [c for _dtype, held in patch._copies.values() for c in held]
    cache_bytes = sum(c.down.numel() * c.down.element_size() + c.up.numel() * c.up.element_size() for c in copies)
    shared = all(c.down.data_ptr() == s[0].data_ptr() for c, s in zip(copies, patch._sources))
    adapter_bytes = sum(d.numel() * d.element_size() + u.numel() * u.element_size() for d, u in patch._sources)
    adapter_bytes += 0 if shared else cache_bytes
    summary = {
        "device": str(mm.get_torch_device()),
        "torch_threads": torch.get_num_threads(),
        "model": f"tiny_flux(hidden_size={args.hidden}, num_heads={args.heads}), float32, "
                 f"{sum(p.numel() for p in base.model.diffusion_model.parameters()) / 1e6:.0f}M params",
        "run": f"latent 1x16x{args.latent}x{args.latent}, {args.steps} euler steps, CFG 3.5 with a negative cond",
        "adapter": f"rank {args.rank} on {len(targets)} layers; T-LoRA schedule alpha 1, min_rank 1, applied {args.apply}",
        "rounds": {"warmup": args.warmup, "steady": args.runs, "settle_s_before_each_run": args.settle},
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "min_s": {k: round(min(v), 4) for k, v in times.items()},
        "median_cpu_s": {k: round(v, 4) for k, v in med_cpu.items()},
        "merged_lora_vs_base": round(med["merged_lora"] / med["base"], 4),
        "tlora_vs_base": round(med["tlora"] / med["base"], 4),
        # robustness checks on a shared machine: the ratio within each round (adjacent in time), and best-of
        "overhead_vs_merged_lora_paired_median": round(statistics.median(t / m for t, m in zip(times["tlora"], times["merged_lora"])), 4),
        "overhead_vs_merged_lora_min": round(min(times["tlora"]) / min(times["merged_lora"]), 4),
        "overhead_vs_merged_lora_cpu_time": round(med_cpu["tlora"] / med_cpu["merged_lora"], 4),
        # how far the headline figure moves with the machine's run-to-run noise
        "overhead_vs_merged_lora_bootstrap_95": bootstrap_ratio_ci(times["tlora"], times["merged_lora"]),
        "flop_floor_full_rank": round(floor_full, 4),
        "flop_floor_active_ranks": round(floor_active, 4),
        "tlora_runtime_share_of_run": round(share, 4),
        "adapter_memory_vs_file": round(adapter_bytes / file_bytes, 3),
        "adapter_memory_on_device_vs_file": round(cache_bytes / file_bytes, 3),
        "tlora_differs_from_base": bool((outputs["tlora"] - outputs["base"]).abs().max() > 0),
        "merged_differs_from_base": bool((outputs["merged_lora"] - outputs["base"]).abs().max() > 0),
        "every_run_repeats_its_first_exactly": repeats_exactly,
        "build_s": round(build_s, 1),
    }
    print(json.dumps(summary, indent=2))
    print(f"overhead_vs_merged_lora={med['tlora'] / med['merged_lora']:.3f}")


if __name__ == "__main__":
    main()
