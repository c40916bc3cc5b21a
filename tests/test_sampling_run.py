"""Full multi-step sampling runs: the T-LoRA's rank is right on every model call, and the final
latent equals an independent reference run that swaps the masked weights in per call.

Samplers with extra evaluations between scheduled sigmas (heun, dpm_2) and CFG batches are
covered, on a flow (Flux-like) and a discrete (SDXL-like) model, in timestep and step-index mode.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # importlib import mode: make the support module importable
import patcher_support as S  # noqa: E402
from devkit.host import pack_module  # noqa: E402

patcher = pack_module("comfy_glue.patcher")
sched = pack_module("tlora_core.schedule")

R = 8
STEPS = 4
STRENGTH = 0.9


pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def models(comfy):
    from devkit.tiny_models import flux_conditioning, sdxl_conditioning, tiny_flux, tiny_sdxl

    flux, sdxl = tiny_flux(seed=3), tiny_sdxl(seed=3)
    return {
        "flux": (flux, S.place(flux, S.FLUX_LAYERS, S.random_ortho(R, seed=31)), flux_conditioning(), torch.zeros(1, 16, 8, 8)),
        "sdxl": (sdxl, S.place(sdxl, S.SDXL_LAYERS, S.random_plain(R, seed=32)), sdxl_conditioning(), torch.zeros(1, 4, 8, 8)),
    }


def _formula(u: float, r_min: int, alpha: float) -> int:
    u = min(max(u, 0.0), 1.0)
    return min(R, int(math.floor(u ** alpha * (R - r_min))) + r_min)


def _step_rank(sigma: float, sample_sigmas: list[float], r_min: int, alpha: float) -> int:
    """Step-index reference: the step whose [sigma_i, sigma_i+1) interval holds sigma; u = i / N."""
    n = len(sample_sigmas) - 1
    tol = 1e-6 * max(1.0, sample_sigmas[0])
    i = max(j for j in range(n) if sample_sigmas[j] >= sigma - tol)
    return _formula(i / n, r_min, alpha)


def _expected_rank(model_sampling, sigma, transformer_options, mode, r_min, alpha):
    if mode == sched.STEP_INDEX:
        ss = [float(s) for s in transformer_options["sample_sigmas"]]
        return _step_rank(float(sigma), ss, r_min, alpha)
    return S.reference_rank(model_sampling, float(sigma), R, r_min, alpha)


def _swap_in_reference(m, placed, mode, r_min, alpha):
    """A reference wrapper, independent of the pack's runtime: per call, add the masked delta
    (ComfyUI LoRA maths: masked up @ down) to the real weights, run, restore them bit-exactly."""
    ms = m.model.model_sampling
    dm = m.model.diffusion_model

    def wrapper(apply_model, args):
        sig = args["timestep"].reshape(-1)
        to = args["c"]["transformer_options"]
        ranks = {_expected_rank(ms, s, to, mode, r_min, alpha) for s in sig.tolist()}
        assert len(ranks) == 1
        (r,) = ranks
        saved = []
        with torch.no_grad():
            for p in placed:
                w = dm.get_submodule(p.bound.module).weight
                ad = p.bound.adapter
                delta = S.masked_up(ad, r) @ ad.down
                target = w if p.bound.out_slice is None else w.narrow(0, *p.bound.out_slice)
                saved.append((w, w.clone()))
                target.add_(STRENGTH * delta.to(device=w.device, dtype=w.dtype))
        try:
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            with torch.no_grad():
                for w, orig in reversed(saved):
                    w.copy_(orig)

    ref = m.clone()
    ref.set_model_unet_function_wrapper(wrapper)
    return ref


def _sample(model, cond, latent, sampler, cfg=2.5):
    import comfy.sample

    pos, neg = cond
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, STEPS, cfg, sampler, "simple", pos, neg, latent, disable_pbar=True, seed=0)


def _current_ranks(model):
    """The ranks the model's T-LoRA set for the call in progress, per batch element, for its modules
    (all of one rank here; None where it set none)."""
    (patch,) = patcher.tlora_patches(model)
    state = patch.runs[-1].layers_for(model.model.diffusion_model).state
    if not hasattr(state, "ranks"):
        return None
    (ranks,) = state.ranks.values()
    return list(ranks)


CASES = [
    ("flux", "euler", sched.TIMESTEP), ("flux", "heun", sched.TIMESTEP), ("flux", "dpm_2", sched.TIMESTEP),
    ("sdxl", "euler", sched.TIMESTEP), ("sdxl", "heun", sched.TIMESTEP), ("sdxl", "dpm_2", sched.TIMESTEP),
    ("flux", "heun", sched.STEP_INDEX), ("sdxl", "dpm_2", sched.STEP_INDEX),
]


@pytest.mark.parametrize("model_name,sampler,mode", CASES)
def test_every_call_gets_its_rank_and_the_run_matches_the_reference(models, model_name, sampler, mode):
    m, placed, cond, latent = models[model_name]
    r_min, alpha = (2, 1.5) if mode == sched.STEP_INDEX else (1, 1.0)
    ms = m.model.model_sampling
    base_sd = {k: v.clone() for k, v in m.model.state_dict().items()}

    # a spy wrapper under ours: it sees every model call with this T-LoRA's ranks set
    calls = []
    holder = {}

    def spy(apply_model, args):
        ranks = _current_ranks(holder["model"])
        calls.append((args["timestep"].reshape(-1).tolist(), ranks, args["c"]["transformer_options"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    spied = m.clone()
    spied.set_model_unet_function_wrapper(spy)
    tl = holder["model"] = patcher.apply_tlora(spied, [p.bound for p in placed],
                                               sched.Schedule(max_rank=R, min_rank=r_min, alpha=alpha, mode=mode), STRENGTH, "run")
    forwards = []
    pre = m.model.diffusion_model.register_forward_pre_hook(lambda mod, a: forwards.append(1))
    try:
        got = _sample(tl, cond, latent, sampler)
    finally:
        pre.remove()

    assert len(calls) == len(forwards) >= STEPS  # the wrapper fired on every model call
    assert all(len(sig) == 2 for sig, _, _ in calls)  # cond + uncond in one batch (CFG)
    seen_ranks = set()
    for sig, ranks, to in calls:
        want = [_expected_rank(ms, s, to, mode, r_min, alpha) for s in sig]
        assert ranks == want, (sig, ranks, want)
        seen_ranks.update(want)
    assert len(seen_ranks) >= 3, seen_ranks  # the run really moves through the schedule
    if sampler != "euler":  # extra evaluations between scheduled sigmas were located, not counted
        assert len(calls) > STEPS

    base = _sample(m, cond, latent, sampler)
    ref = _sample(_swap_in_reference(m, placed, mode, r_min, alpha), cond, latent, sampler)
    assert S.rel_err(got, ref, base) < 1e-3
    # negative control: the same run with the unmasked adapter is far from the reference
    full = patcher.apply_tlora(m, [p.bound for p in placed], sched.Schedule(max_rank=R, min_rank=R), STRENGTH, "full")
    assert S.rel_err(_sample(full, cond, latent, sampler), ref, base) > 0.05

    assert S.hooks_left(m) == 0
    sd = m.model.state_dict()
    assert all(torch.equal(sd[k].cpu(), v.cpu()) for k, v in base_sd.items())


MERGE_CASES = [("flux", "euler", sched.TIMESTEP), ("flux", "dpm_2", sched.TIMESTEP), ("sdxl", "heun", sched.TIMESTEP),
               ("flux", "heun", sched.STEP_INDEX)]


@pytest.mark.parametrize("model_name,sampler,mode", MERGE_CASES)
def test_merge_mode_run_matches_the_reference_and_restores_the_weights(models, model_name, sampler, mode, monkeypatch):
    """Merge mode: the same run as the swap-in reference, with the weights rewritten only where the
    rank changes (never per call, no hooks), and bit-exactly restored afterwards."""
    merge_mod = pack_module("comfy_glue.merge")
    m, placed, cond, latent = models[model_name]
    r_min, alpha = (2, 1.5) if mode == sched.STEP_INDEX else (1, 1.0)
    ms = m.model.model_sampling
    base_sd = {k: v.clone() for k, v in m.model.state_dict().items()}
    call_ranks, rewrites, attached = [], [], []

    def spy(apply_model, args):
        to = args["c"]["transformer_options"]
        call_ranks.append(_expected_rank(ms, args["timestep"].reshape(-1)[0], to, mode, r_min, alpha))
        return apply_model(args["input"], args["timestep"], **args["c"])

    real_merge, real_hooks = merge_mod.rt.merge_prefix_, patcher.LayerHooks
    monkeypatch.setattr(merge_mod.rt, "merge_prefix_", lambda *a: (rewrites.append(a[3]), real_merge(*a)))
    monkeypatch.setattr(patcher, "LayerHooks", lambda *a, **k: (attached.append(1), real_hooks(*a, **k))[1])
    spied = m.clone()
    spied.set_model_unet_function_wrapper(spy)
    tl = patcher.apply_tlora(spied, [p.bound for p in placed],
                             sched.Schedule(max_rank=R, min_rank=r_min, alpha=alpha, mode=mode), STRENGTH, "merged", merge=True)
    got = _sample(tl, cond, latent, sampler)
    monkeypatch.undo()

    changes = sum(1 for i, r in enumerate(call_ranks) if r != (call_ranks[i - 1] if i else 0))
    assert len(set(call_ranks)) >= 3 and len(call_ranks) > changes  # some calls reuse the merged weights
    assert len(rewrites) == changes * len(placed) and not attached
    base = _sample(m, cond, latent, sampler)
    ref = _sample(_swap_in_reference(m, placed, mode, r_min, alpha), cond, latent, sampler)
    assert S.rel_err(got, ref, base) < 1e-3
    sd = m.model.state_dict()
    assert all(torch.equal(sd[k].cpu(), v.cpu()) for k, v in base_sd.items()) and merge_mod._MERGING == {}
