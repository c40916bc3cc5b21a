"""The model patcher's behaviour in a real ComfyUI: isolation, leak-freedom, stacking, chaining,
per-sample masks, strength, storage formats, and what happens outside sampling.

References are ComfyUI's own LoRA merge of the equivalently masked adapter (patcher_support).
"""

from __future__ import annotations

import copy
import logging
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
TOL = 1e-3
SIGMAS = [0.9, 0.5, 0.15]
LATENT = torch.zeros(1, 16, 8, 8)


pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def flux(comfy):
    from devkit.tiny_models import flux_conditioning, tiny_flux

    m = tiny_flux(seed=0)
    placed = S.place(m, S.FLUX_LAYERS, S.random_plain(R, seed=21))
    return m, placed, flux_conditioning()


def _schedule(**kw):
    return sched.Schedule(max_rank=kw.pop("max_rank", R), **kw)


def _sample(model, cond, steps=3, sampler="euler", cfg=2.0, callback=None, latent=LATENT):
    import comfy.sample

    pos, neg = cond
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", pos, neg, latent,
                               disable_pbar=True, seed=0, callback=callback)


def _check_against(model, reference_for_rank, m, cond, ms_rank, sigmas=SIGMAS):
    """Max rel. error of ``model`` vs the reference merge at each sigma's rank."""
    pos, neg = cond
    errs = []
    for sigma in sigmas:
        base = S.denoise_once(m, sigma, pos, neg, LATENT)
        ref = S.denoise_once(reference_for_rank(ms_rank(sigma)), sigma, pos, neg, LATENT)
        got = S.denoise_once(model, sigma, pos, neg, LATENT)
        errs.append(S.rel_err(got, ref, base))
    return max(errs)


def _rank_fn(m, R_=R, r_min=1, alpha=1.0):
    ms = m.model.model_sampling
    return lambda sigma: S.reference_rank(ms, sigma, R_, r_min, alpha)


def _assert_clean(m, runtime=None, base_sd=None):
    assert S.hooks_left(m) == 0
    if runtime is not None:
        assert runtime.runs == [] and pack_module("comfy_glue.merge")._MERGING == {}
    if base_sd is not None:
        sd = m.model.state_dict()
        assert sd.keys() == base_sd.keys()
        assert all(torch.equal(sd[k].cpu(), base_sd[k].cpu()) for k in base_sd)


# --- isolation and leaks ---------------------------------------------------------------------
def test_input_untouched_clone_shares_the_patch(flux):
    m, placed, _ = flux
    before = dict(m.model_options)
    tl = patcher.apply_tlora(m, [p.bound for p in placed], _schedule(), 1.0, "iso")
    assert tl is not m and tl.model is m.model
    assert m.model_options.keys() == before.keys() and "model_function_wrapper" not in m.model_options
    assert patcher.tlora_patches(m) == []
    (patch,) = patcher.tlora_patches(tl)
    wrapper = tl.model_options["model_function_wrapper"]
    assert wrapper.patch is patch and (patch.name, patch.strength, patch.schedule) == ("iso", 1.0, _schedule())
    # ComfyUI (before 0.28) deep-copies model_options on every clone: the patch (and its tensors) is shared
    c = tl.clone()
    assert c.model_options["model_function_wrapper"].patch is patch and patcher.tlora_patches(c) == [patch]
    assert copy.deepcopy(wrapper).patch is patch
    assert wrapper.to(torch.device("cpu")) is wrapper and wrapper.to(torch.float16) is wrapper


@pytest.mark.parametrize("merge", [False, True], ids=["per-layer", "merge"])
def test_leak_free_after_finish_error_and_interrupt(flux, merge):
    """Nothing outlives a run, however it ends: no hooks, no state, and (merge mode) the weights
    restored bit-exactly."""
    import comfy.model_management as mm

    m, placed, cond = flux
    base_sd = {k: v.clone() for k, v in m.model.state_dict().items()}
    base_out = _sample(m, cond)
    targets = [p.bound for p in placed]

    # finished
    tl = patcher.apply_tlora(m, targets, _schedule(), 1.0, "finish", merge=merge)
    out = _sample(tl, cond)
    assert not torch.equal(out, base_out)
    _assert_clean(m, patcher.tlora_patches(tl)[0], base_sd)

    # an error raised inside a model call (a foreign wrapper under ours)
    calls = []

    def boom(apply_model, args):
        calls.append(1)
        if len(calls) == 2:
            if merge:  # raised while the weights carried the adapter
                t = placed[0].comfy_target
                key = t if isinstance(t, str) else t[0]
                assert not torch.equal(m.model.state_dict()[key], base_sd[key])
            else:
                assert S.hooks_left(m) > 0  # raised while the adapters were on
            raise RuntimeError("boom")
        return apply_model(args["input"], args["timestep"], **args["c"])

    m2 = m.clone()
    m2.set_model_unet_function_wrapper(boom)
    tl2 = patcher.apply_tlora(m2, targets, _schedule(), 1.0, "error", merge=merge)
    with pytest.raises(RuntimeError, match="boom"):
        _sample(tl2, cond)
    _assert_clean(m, patcher.tlora_patches(tl2)[0], base_sd)

    # ComfyUI's interrupt: flagged at step 1, raised by the next op inside the diffusion model
    def interrupt(step, x0, x, total):
        if step == 1:
            mm.interrupt_current_processing(True)

    tl3 = patcher.apply_tlora(m, targets, _schedule(), 1.0, "interrupt", merge=merge)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _sample(tl3, cond, callback=interrupt)
    finally:
        mm.interrupt_current_processing(False)
    _assert_clean(m, patcher.tlora_patches(tl3)[0], base_sd)

    assert torch.equal(_sample(m, cond), base_out)  # bit-identical to never loading it


def test_other_clones_and_branches_untouched(flux):
    m, placed, cond = flux
    base_out = _sample(m, cond)
    a = [p.bound for p in placed[:7]]
    b_placed = S.place(m, S.FLUX_LAYERS[5:], S.random_ortho(4, seed=22))
    tl_a = patcher.apply_tlora(m, a, _schedule(), 1.0, "A")
    tl_b = patcher.apply_tlora(m, [p.bound for p in b_placed], _schedule(max_rank=4, alpha=2.0), 1.0, "B")
    sibling = m.clone()
    ref_a = lambda r: S.comfy_merge(m, S.lora_state_dict(placed[:7], r))
    ref_b = lambda r: S.comfy_merge(m, S.lora_state_dict(b_placed, r))
    # interleave the branches: each one sees only its own adapters
    assert _check_against(tl_a, ref_a, m, cond, _rank_fn(m)) < TOL
    assert torch.equal(_sample(sibling, cond), base_out)
    assert _check_against(tl_b, ref_b, m, cond, _rank_fn(m, 4, 1, 2.0)) < TOL
    assert _check_against(tl_a, ref_a, m, cond, _rank_fn(m), sigmas=SIGMAS[:1]) < TOL
    assert torch.equal(_sample(m, cond), base_out)
    _assert_clean(m)


# --- stacking and chaining ---------------------------------------------------------------------
def test_two_tloras_with_different_schedules_stack(flux):
    m, placed, cond = flux
    b_placed = S.place(m, S.FLUX_LAYERS[3:], S.random_ortho(4, seed=23))  # overlaps A on 4 layers
    sa, sb = _schedule(), _schedule(max_rank=4, min_rank=2, alpha=2.0)
    ra, rb = _rank_fn(m), _rank_fn(m, 4, 2, 2.0)
    for first, second in (("A", "B"), ("B", "A")):
        model = m
        for which in (first, second):
            if which == "A":
                model = patcher.apply_tlora(model, [p.bound for p in placed], sa, 0.9, "A")
            else:
                model = patcher.apply_tlora(model, [p.bound for p in b_placed], sb, -0.7, "B")
        assert len(patcher.tlora_patches(model)) == 2
        pos, neg = cond
        for sigma in SIGMAS:
            ref_m = S.comfy_merge(S.comfy_merge(m, S.lora_state_dict(placed, ra(sigma)), 0.9),
                                  S.lora_state_dict(b_placed, rb(sigma)), -0.7)
            base = S.denoise_once(m, sigma, pos, neg, LATENT)
            ref = S.denoise_once(ref_m, sigma, pos, neg, LATENT)
            got = S.denoise_once(model, sigma, pos, neg, LATENT)
            assert S.rel_err(got, ref, base) < TOL, (first, sigma)
    _assert_clean(m)


def test_with_comfy_lora_loader_in_either_order(flux):
    import comfy.sd

    m, placed, cond = flux
    lora_placed = S.place(m, S.FLUX_LAYERS[::2], S.random_plain(4, seed=24))
    lora_sd = S.lora_state_dict(lora_placed, None)  # a plain LoRA file, as LoraLoader reads it
    targets = [p.bound for p in placed]
    after = comfy.sd.load_lora_for_models(patcher.apply_tlora(m, targets, _schedule(), 0.8, "T"), None, lora_sd, 0.6, 0)[0]
    before = patcher.apply_tlora(comfy.sd.load_lora_for_models(m, None, lora_sd, 0.6, 0)[0], targets, _schedule(), 0.8, "T")
    rank = _rank_fn(m)
    ref = lambda r: S.comfy_merge(S.comfy_merge(m, lora_sd, 0.6), S.lora_state_dict(placed, r), 0.8)
    assert _check_against(after, ref, m, cond, rank) < TOL
    assert _check_against(before, ref, m, cond, rank) < TOL
    _assert_clean(m)


def test_foreign_model_function_wrapper_before_and_after(flux, caplog):
    m, placed, cond = flux
    targets = [p.bound for p in placed]
    ref = lambda r: S.comfy_merge(m, S.lora_state_dict(placed, r))
    rank = _rank_fn(m)
    seen = []

    def foreign(apply_model, args):  # a typical pack's wrapper: calls the model itself
        seen.append(float(args["timestep"][0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    # set before: ours must chain it
    m1 = m.clone()
    m1.set_model_unet_function_wrapper(foreign)
    tl = patcher.apply_tlora(m1, targets, _schedule(), 1.0, "chained")
    assert _check_against(tl, ref, m, cond, rank) < TOL
    assert sorted(set(seen)) == pytest.approx(sorted(SIGMAS))  # called for every T-LoRA evaluation

    # set after, chaining the previous one (a well-behaved pack)
    tl = patcher.apply_tlora(m, targets, _schedule(), 1.0, "under")
    prev = tl.model_options["model_function_wrapper"]
    chained = tl.clone()
    chained.set_model_unet_function_wrapper(lambda am, a: prev(am, a))
    assert _check_against(chained, ref, m, cond, rank) < TOL

    # set after, dropping ours: the APPLY_MODEL fallback still masks correctly, and says so
    dropped = tl.clone()
    seen.clear()
    dropped.set_model_unet_function_wrapper(foreign)
    with caplog.at_level(logging.WARNING, logger="comfyui_tlora"):
        assert _check_against(dropped, ref, m, cond, rank) < TOL
    assert seen and sum("without chaining" in r.getMessage() for r in caplog.records) == 1
    _assert_clean(m)


# --- calls: per-sample masks, outside sampling ---------------------------------------------------
def _direct_args(cond, sigmas, transformer_options=None):
    pos, _ = cond
    ctx, extra = pos[0]
    n = len(sigmas)
    x = torch.randn(n, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    return {"input": x, "timestep": torch.tensor(sigmas),
            "c": {"c_crossattn": ctx.repeat(n, 1, 1), "y": extra["pooled_output"].repeat(n, 1),
                  "transformer_options": transformer_options or {}},
            "cond_or_uncond": [0]}


def _apply(model, args, through_wrapper=True):
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    if through_wrapper and "model_function_wrapper" in model.model_options:
        return model.model_options["model_function_wrapper"](model.model.apply_model, args)
    return model.model.apply_model(args["input"], args["timestep"], **args["c"])


def test_per_sample_masks_when_a_call_carries_several_sigmas(flux):
    m, placed, cond = flux
    tl = patcher.apply_tlora(m, [p.bound for p in placed], _schedule(), 1.0, "batch")
    sigmas = [0.9, 0.15, 0.5]
    rank = _rank_fn(m)
    assert len({rank(s) for s in sigmas}) == 3
    args = _direct_args(cond, sigmas)
    got = _apply(tl, args)
    base = _apply(m, args)
    for i, s in enumerate(sigmas):
        one = {**args, "input": args["input"][i:i + 1], "timestep": args["timestep"][i:i + 1],
               "c": {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in args["c"].items()}}
        ref = _apply(S.comfy_merge(m, S.lora_state_dict(placed, rank(s))), one)
        assert S.rel_err(got[i:i + 1], ref, base[i:i + 1]) < TOL, s
    _assert_clean(m, patcher.tlora_patches(tl)[0])


def test_outside_sampling_adds_nothing_and_warns_once(flux, caplog):
    m, placed, cond = flux
    targets = [p.bound for p in placed]
    args = _direct_args(cond, [0.5])
    base = _apply(m, args)

    # the plain model call (no sampler, no wrapper): nothing attached, base output
    tl = patcher.apply_tlora(m, targets, _schedule(), 1.0, "outside")
    assert torch.equal(_apply(tl, args, through_wrapper=False), base)

    # step-index schedule but no sampler sigmas known: no rank can be derived -> nothing, one warning
    tl = patcher.apply_tlora(m, targets, _schedule(mode=sched.STEP_INDEX), 1.0, "stepless")
    with caplog.at_level(logging.WARNING, logger="comfyui_tlora"):
        assert torch.equal(_apply(tl, args), base)
        assert torch.equal(_apply(tl, args), base)
    assert sum("without a known noise level" in r.getMessage() for r in caplog.records) == 1
    # ... and with the sampler's sigmas it does act
    assert not torch.equal(_apply(tl, _direct_args(cond, [0.5], {"sample_sigmas": torch.tensor([1.0, 0.5, 0.0])})), base)

    # the diffusion model run directly during a sampling run (e.g. by a preview callback):
    # the hooks are on but no call of ours is in progress -> nothing added, one warning
    caplog.clear()
    tl = patcher.apply_tlora(m, targets, _schedule(), 1.0, "preview")
    dm = m.model.diffusion_model
    pos, _ = cond
    probe = dict(x=torch.randn(1, 16, 8, 8), timestep=torch.tensor([0.5]), context=pos[0][0], y=pos[0][1]["pooled_output"])
    seen = []

    def callback(step, x0, x, total):
        with torch.no_grad():
            seen.append(dm(**probe))

    with caplog.at_level(logging.WARNING, logger="comfyui_tlora"):
        _sample(tl, cond, callback=callback)
    assert len(seen) == 3 and S.hooks_left(m) == 0
    with torch.no_grad():
        clean = dm(**probe)
    assert all(torch.equal(s, clean) for s in seen)
    assert sum("outside a sampler call" in r.getMessage() for r in caplog.records) == 1
    _assert_clean(m)


# --- storage formats and memory ------------------------------------------------------------------
def test_fp8_stored_weights(comfy, flux):
    _, _, cond = flux
    q, d = S.fp8_flux()
    assert any(p.dtype == torch.float8_e4m3fn for p in q.model.diffusion_model.parameters())
    placed = S.place(d, S.FLUX_LAYERS, S.random_ortho(R, seed=25))
    tl = patcher.apply_tlora(q, [p.bound for p in placed], _schedule(), 1.0, "fp8")
    pos, neg = cond
    for sigma in SIGMAS:
        base = S.denoise_once(q, sigma, pos, neg, LATENT)
        assert torch.allclose(base, S.denoise_once(d, sigma, pos, neg, LATENT), atol=1e-5)  # same base function
        ref = S.denoise_once(S.comfy_merge(d, S.lora_state_dict(placed, _rank_fn(d)(sigma))), sigma, pos, neg, LATENT)
        got = S.denoise_once(tl, sigma, pos, neg, LATENT)
        assert S.rel_err(got, ref, base) < TOL
    assert all(p.dtype == torch.float8_e4m3fn for n, p in q.model.diffusion_model.named_parameters() if n.endswith("qkv.weight"))
    _assert_clean(q)


def test_quantized_layers_without_a_float_weight(comfy, flux):
    """Output-level adapters never read the layer's weight: a GGUF-style quantized layer works, and
    equals ComfyUI's merge on the same model with those layers dequantized."""
    from devkit.tiny_models import tiny_flux

    _, _, cond = flux
    q, d = tiny_flux(seed=0), tiny_flux(seed=0)
    for path in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.img_mlp.0"):
        parent, name = path.rsplit(".", 1)
        ql = S.QuantLinear(q.model.diffusion_model.get_submodule(path))
        setattr(q.model.diffusion_model.get_submodule(parent), name, ql)
        with torch.no_grad():
            d.model.diffusion_model.get_submodule(path).weight.copy_(ql.dequantized())
    placed = S.place(d, S.FLUX_LAYERS, S.random_plain(R, seed=26))
    tl = patcher.apply_tlora(q, [p.bound for p in placed], _schedule(), 1.0, "quant")
    pos, neg = cond
    for sigma in SIGMAS:
        base = S.denoise_once(q, sigma, pos, neg, LATENT)
        assert torch.allclose(base, S.denoise_once(d, sigma, pos, neg, LATENT), atol=1e-5)
        ref = S.denoise_once(S.comfy_merge(d, S.lora_state_dict(placed, _rank_fn(d)(sigma))), sigma, pos, neg, LATENT)
        assert S.rel_err(S.denoise_once(tl, sigma, pos, neg, LATENT), ref, base) < TOL
    _assert_clean(q)


def _cpu_only():
    """Skip where the in-process ComfyUI computes on a GPU (``TLORA_COMFY_GPU=1``): the test is
    about what happens on the CPU."""
    import comfy.model_management as mm

    if mm.get_torch_device().type != "cpu":
        pytest.skip("checks CPU behaviour; ComfyUI runs on a GPU here")


def test_adapters_cached_once_per_device_dtype_without_copies(flux):
    _cpu_only()
    m, placed, cond = flux
    tl = patcher.apply_tlora(m, [p.bound for p in placed], _schedule(), 1.0, "cache")
    patch = patcher.tlora_patches(tl)[0]
    _sample(tl, cond, steps=1)
    cpu = torch.device("cpu")
    # fp32 on the CPU: the file's tensors are used as they are, no copy
    (held,) = patch._copies.items()
    assert held[0] == cpu and held[1][0] == torch.float32
    for c, p in zip(held[1][1], placed):
        assert c.down.data_ptr() == p.bound.adapter.down.data_ptr() and c.up.data_ptr() == p.bound.adapter.up.data_ptr()
    # another activation dtype: one converted copy replaces that device's (never one per call)
    with torch.inference_mode():  # as in ComfyUI's executor; the copies must stay usable outside it
        w = patch.adapters_on(cpu, torch.bfloat16)
    assert patch.adapters_on(cpu, torch.bfloat16) is w and all(c.down.dtype == torch.bfloat16 for c in w)
    assert not any(c.down.is_inference() or c.up.is_inference() for c in w)
    src = sum(p.bound.adapter.down.numel() + p.bound.adapter.up.numel() for p in placed)
    assert len(patch._copies) == 1 and sum(c.down.numel() + c.up.numel() for c in patch._copies[cpu][1]) == src


def test_adapters_follow_the_model_to_its_load_device(flux):
    """ComfyUI's model load calls ``model_patches_to(load device)`` then ``(model dtype)``: the adapters
    are copied there then, once, not inside the first sampling call. The detach / reload that every
    sampling run does keeps them; an unload frees them. ('meta' stands in for a GPU here.)"""
    m, placed, cond = flux
    tl = patcher.apply_tlora(m, [p.bound for p in placed], _schedule(), 1.0, "follow")
    patch = patcher.tlora_patches(tl)[0]
    meta = torch.device("meta")
    tl.load_device = meta  # as the model of a GPU would be
    tl.model_patches_to(meta)
    tl.model_patches_to(torch.float16)
    assert list(patch._copies) == [meta] and patch._copies[meta][0] == torch.float16
    cached = patch._copies[meta][1]
    assert [(c.down.device, c.down.dtype, c.down.shape, c.up.shape) for c in cached] == \
        [(meta, torch.float16, p.bound.adapter.down.shape, p.bound.adapter.up.shape) for p in placed]
    assert patch.adapters_on(meta, torch.float16) is cached  # what the first call finds: no copy
    tl.detach(unpatch_all=False)  # a run's reload of the same model: offloaded patches, weights stay
    tl.model_patches_to(meta)
    tl.model_patches_to(torch.float16)
    assert patch._copies[meta][1] is cached
    tl.detach(unpatch_all=True)  # unloaded
    assert patch._copies == {}
    tl.model_patches_to(meta)
    tl.model_patches_to(torch.float8_e4m3fn)  # fp8 storage: the compute dtype is not known yet
    assert patch._copies == {}


def test_cpu_adapter_threads_policy_and_restore(flux, monkeypatch):
    """On a <= 2-thread CPU the adapters' small matmuls run on one thread (no OpenMP barrier per op);
    torch's setting is restored after every layer, errors included."""
    _cpu_only()
    m, placed, cond = flux
    tl = patcher.apply_tlora(m, [p.bound for p in placed], _schedule(), 1.0, "threads")
    runtime_mod = pack_module("tlora_core.runtime")
    seen = []
    orig = runtime_mod.add_prefix_2d_

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return orig(*a, **k)

    monkeypatch.setattr(runtime_mod, "add_prefix_2d_", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _sample(tl, cond, steps=1)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setenv("COMFYUI_TLORA_CPU_THREADS", "0")  # torch's own setting
        _sample(tl, cond, steps=1)
        assert set(seen) == {2} and torch.get_num_threads() == 2

        def boom(*a, **k):
            raise RuntimeError("inside the adapter")

        monkeypatch.delenv("COMFYUI_TLORA_CPU_THREADS")
        monkeypatch.setattr(runtime_mod, "add_prefix_2d_", boom)
        with pytest.raises(RuntimeError, match="inside the adapter"):
            _sample(tl, cond, steps=1)
        assert torch.get_num_threads() == 2
        _assert_clean(m, patcher.tlora_patches(tl)[0])
    finally:
        torch.set_num_threads(before)
