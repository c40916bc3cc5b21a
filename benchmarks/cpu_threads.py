"""The CPU thread choice of the runtime, A/B in one process: is one thread for the adapters right?

On CPUs with <= 2 intra-op threads the runtime runs the adapters' skinny matmuls on one thread
(``comfy_glue.hooks.cpu_adapter_threads``). This benchmark samples, rotating the order each round:
  merged        a plain rank-64 LoRA merged by ComfyUI's own loader (the reference);
  tlora_1       the pack's T-LoRA with its adapters on one thread (the default on such CPUs);
  tlora_torch   the same T-LoRA with torch's own thread setting (COMFYUI_TLORA_CPU_THREADS=0);
on the benchmark model of ``benchmarks/overhead.py`` (one weight copy, the same settle pause before
every timed run). ``--busy`` runs a busy loop in another
process for the duration, as a second program on a shared 2-core machine would.
Prints a JSON summary; the last line is ``one_thread_vs_torch_threads=X.XXX`` (paired median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import overhead  # noqa: E402
from devkit import host  # noqa: E402

ENV = "COMFYUI_TLORA_CPU_THREADS"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=12, help="steady-state rounds (median)")
    p.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait before each timed run (overhead.py)")
    args = p.parse_args(argv)

    host.load_comfy(cpu=True)
    host.import_pack()
    import torch

    import comfy.model_management as mm
    import comfy.sample

    from devkit.tiny_models import flux_conditioning

    patcher = host.pack_module("comfy_glue.patcher")
    sched = host.pack_module("tlora_core.schedule")
    _, merged, tl_model, targets, _ = overhead.build(args)
    tlora = patcher.apply_tlora(tl_model, targets, sched.Schedule(max_rank=args.rank, min_rank=1, alpha=1.0), 1.0,
                                "bench")
    pos, neg = flux_conditioning()
    latent = torch.zeros(1, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(model):
        return comfy.sample.sample(model, noise, args.steps, 3.5, "euler", "simple", pos, neg, latent,
                                   disable_pbar=True, seed=0)

    variants = [("merged_lora", merged, None), ("tlora_1", tlora, "1"), ("tlora_torch", tlora, "0")]
    times = {name: [] for name, _, _ in variants}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    saved = os.environ.get(ENV)
    try:
        for i in range(1 + args.runs):  # round 0 warms up
            for name, model, threads in variants[i % 3:] + variants[:i % 3]:
                if threads is None:
                    os.environ.pop(ENV, None)
                else:
                    os.environ[ENV] = threads  # read when the run's hooks are made
                mm.load_models_gpu([model])  # merge / restore the LoRA in place (one weight copy), untimed
                time.sleep(args.settle)  # as in overhead.py: freed memory is reported to a VM's host later
                t = time.perf_counter()
                sample(model)
                if i:
                    times[name].append(time.perf_counter() - t)
    finally:
        if busy is not None:
            busy.kill()
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved

    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(a, b):
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 4)

    summary = {
        "torch_threads": torch.get_num_threads(),
        "busy_loop_on_another_core": args.busy,
        "rounds": args.runs,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "tlora_1_vs_merged_lora": round(med["tlora_1"] / med["merged_lora"], 4),
        "tlora_torch_vs_merged_lora": round(med["tlora_torch"] / med["merged_lora"], 4),
        "tlora_1_vs_merged_lora_paired": paired("tlora_1", "merged_lora"),
        "tlora_torch_vs_merged_lora_paired": paired("tlora_torch", "merged_lora"),
    }
    print(json.dumps(summary, indent=2))
    print(f"one_thread_vs_torch_threads={paired('tlora_1', 'tlora_torch'):.3f}")


if __name__ == "__main__":
    main()
