"""Merge mode (``apply_tlora(merge=True)``, ``nodes.merge``) where it must step aside: a call whose
batch mixes ranks, weights it cannot carry the adapter in (fp8, quantized), a layer another T-LoRA
already merges into, ComfyUI's own hooks on the conditioning, and too little free memory for the
copies. Each falls back to the per-layer hooks, says so once, and leaves the weights as they were.

(Its runs against an independent reference: tests/test_sampling_run.py; its restoration after an
error or interrupt: tests/test_patcher.py.)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # importlib import mode: make the support module importable
import patcher_support as S  # noqa: E402
from devkit.host import pack_module  # noqa: E402

patcher = pack_module("comfy_glue.patcher")
merge_mod = pack_module("comfy_glue.merge")
sched = pack_module("tlora_core.schedule")

R = 8
LATENT = torch.zeros(1, 16, 8, 8)

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def flux(comfy):
    from devkit.tiny_models import flux_conditioning, tiny_flux

    m = tiny_flux(seed=1)
    return m, S.place(m, S.FLUX_LAYERS, S.random_plain(R, seed=41)), flux_conditioning()


def _sample(model, cond, latent=LATENT, steps=3):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", cond[0], cond[1], latent,
                               disable_pbar=True, seed=0)


def _weights(m):
    return {k: v.detach().cpu().clone() for k, v in m.model.state_dict().items()}


def _unchanged(m, before):
    sd = m.model.state_dict()
    return all(torch.equal(sd[k].cpu(), v) for k, v in before.items()) and merge_mod._MERGING == {}


def _spy(monkeypatch):
    """Records the k of every weight rewrite and every hook attachment."""
    rewrites, attached = [], []
    real_merge, real_hooks = merge_mod.rt.merge_prefix_, patcher.LayerHooks
    monkeypatch.setattr(merge_mod.rt, "merge_prefix_", lambda *a: (rewrites.append(a[3]), real_merge(*a)))
    monkeypatch.setattr(patcher, "LayerHooks", lambda *a, **k: (attached.append(1), real_hooks(*a, **k))[1])
    return rewrites, attached


def test_a_call_with_mixed_ranks_gets_the_hooks_on_the_base_weights(flux, monkeypatch):
    """A custom sampler calls the model at one sigma, at two different ones in one batch, then at
    one again: the middle call runs on the restored base weights with per-sample hooks."""
    import comfy.sample
    import comfy.samplers

    m, placed, cond = flux
    before = _weights(m)

    def three_calls(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        a = model(x, sigmas[0] * s_in, **extra_args)
        b = model(x, torch.stack([sigmas[0], sigmas[2]]), **extra_args)  # latent batch of 2: mixed ranks
        c = model(x, sigmas[2] * s_in, **extra_args)
        return torch.cat([a, b, c], 1)

    latent = torch.zeros(2, 16, 8, 8)
    sigmas = torch.tensor([0.9, 0.5, 0.15, 0.0])
    ms = m.model.model_sampling
    ranks = [S.reference_rank(ms, float(s), R) for s in sigmas[[0, 2]]]
    assert ranks[0] != ranks[1]

    def run(model):
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample_custom(model, noise, 2.0, comfy.samplers.KSAMPLER(three_calls), sigmas,
                                          cond[0], cond[1], latent, disable_pbar=True, seed=0)

    targets = [p.bound for p in placed]
    rewrites, attached = _spy(monkeypatch)
    got = run(patcher.apply_tlora(m, targets, sched.Schedule(max_rank=R), 1.0, "mixed", merge=True))
    assert rewrites == [ranks[0]] * len(placed) + [0] * len(placed) + [ranks[1]] * len(placed)
    assert len(attached) == 1  # hooks from the mixed call on (the later merged call skips them)
    monkeypatch.undo()
    per_layer = run(patcher.apply_tlora(m, targets, sched.Schedule(max_rank=R), 1.0, "hooks"))
    assert S.rel_err(got, per_layer, run(m)) < 1e-4  # the same function, other rounding
    assert _unchanged(m, before)


def test_weights_it_cannot_merge_into_fall_back_to_the_hooks(comfy, flux, monkeypatch, caplog):
    """fp8-stored weights (ComfyUI casts them per call) and a quantized layer without a float weight:
    the run says why once and is exactly the per-layer run."""
    from devkit.tiny_models import tiny_flux

    _, _, cond = flux
    q8, d8 = S.fp8_flux()
    quant = tiny_flux(seed=0)
    path = "double_blocks.0.img_attn.qkv"
    parent, name = path.rsplit(".", 1)
    setattr(quant.model.diffusion_model.get_submodule(parent), name, S.QuantLinear(quant.model.diffusion_model.get_submodule(path)))
    for model, ref_model, why in ((q8, d8, "float8_e4m3fn weights"), (quant, tiny_flux(seed=0), "no weight tensor")):
        placed = S.place(ref_model, S.FLUX_LAYERS, S.random_plain(R, seed=42))
        targets = [p.bound for p in placed]
        before = _weights(model)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="comfyui_tlora"):
            tl = patcher.apply_tlora(model, targets, sched.Schedule(max_rank=R), 1.0, "cannot", merge=True)
            got = _sample(tl, cond)
            again = _sample(tl, cond)
        notes = [r.getMessage() for r in caplog.records if "merge mode not possible" in r.getMessage()]
        assert len(notes) == 1 and why in notes[0], notes
        want = _sample(patcher.apply_tlora(model, targets, sched.Schedule(max_rank=R), 1.0, "hooks"), cond)
        assert torch.equal(got, want) and torch.equal(again, want)
        assert _unchanged(model, before) and S.hooks_left(model) == 0


def test_a_layer_another_tlora_merges_into_gets_the_hooks(flux, caplog):
    """Two merge-mode T-LoRAs on overlapping layers: the outer one merges, the inner one (whose
    weights would be rewritten under it) applies itself per layer; together as the per-layer stack."""
    m, placed, cond = flux
    before = _weights(m)
    b_placed = S.place(m, S.FLUX_LAYERS[3:], S.random_ortho(4, seed=43))

    def stack(merge):
        a = patcher.apply_tlora(m, [p.bound for p in placed], sched.Schedule(max_rank=R), 0.8, "A", merge=merge)
        return patcher.apply_tlora(a, [p.bound for p in b_placed], sched.Schedule(max_rank=4, alpha=2.0), 0.6, "B", merge=merge)

    with caplog.at_level(logging.WARNING, logger="comfyui_tlora"):
        got = _sample(stack(True), cond)
    assert any("another T-LoRA merges into it" in r.getMessage() and "'A'" in r.getMessage() for r in caplog.records)
    assert S.rel_err(got, _sample(stack(False), cond), _sample(m, cond)) < 1e-4
    assert _unchanged(m, before)


def test_too_little_free_memory_for_the_copies_falls_back(flux, monkeypatch, caplog):
    m, placed, cond = flux
    before = _weights(m)
    monkeypatch.setattr(merge_mod, "MAX_FREE_SHARE", 1e-9)  # as if a copy of the weights did not fit
    rewrites, attached = _spy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="comfyui_tlora"):
        tl = patcher.apply_tlora(m, [p.bound for p in placed], sched.Schedule(max_rank=R), 1.0, "small", merge=True)
        got = _sample(tl, cond)
    assert any("does not fit in free memory" in r.getMessage() for r in caplog.records)
    assert rewrites == [] and len(attached) == 1  # the hooks, once for the whole run
    monkeypatch.undo()
    assert torch.equal(got, _sample(patcher.apply_tlora(m, [p.bound for p in placed], sched.Schedule(max_rank=R), 1.0, "h"), cond))
    assert _unchanged(m, before)


def test_comfy_hooks_on_the_conditioning_keep_it_per_layer(flux, caplog):
    """ComfyUI's own hooks (a keyframed LoRA on the conditioning) patch the weights during the run:
    merge mode stays out of their way; the run is exactly the per-layer one."""
    import comfy.hooks
    import comfy.lora

    m, placed, cond = flux
    before = _weights(m)
    hook_sd = S.lora_state_dict(S.place(m, S.FLUX_LAYERS[:4], S.random_plain(4, seed=44)), None)
    hooks = comfy.hooks.create_hook_lora(comfy.lora.load_lora(hook_sd, S.model_keys(m)), 0.7, 0.0)
    hooked = (comfy.hooks.set_hooks_for_conditioning(cond[0], hooks), cond[1])
    targets = [p.bound for p in placed]
    with caplog.at_level(logging.WARNING, logger="comfyui_tlora"):
        got = _sample(patcher.apply_tlora(m, targets, sched.Schedule(max_rank=R), 1.0, "hooked", merge=True), hooked)
    assert any("ComfyUI hooks" in r.getMessage() for r in caplog.records)
    assert torch.equal(got, _sample(patcher.apply_tlora(m, targets, sched.Schedule(max_rank=R), 1.0, "h"), hooked))
    assert not torch.equal(got, _sample(patcher.apply_tlora(m, targets, sched.Schedule(max_rank=R), 1.0, "h"), cond))
    assert _unchanged(m, before)


def test_a_weight_adapted_twice_merges_as_per_layer(flux, monkeypatch):
    """A file whose modules overlap on one weight (a slice of a fused qkv, the same slice again, and
    the whole qkv, as name aliases can make): merged, every adapter's delta is summed onto the
    weight, as the per-layer hooks add them."""
    m, placed, cond = flux
    before = _weights(m)
    twice = (S.place(m, ["double_blocks_0_img_attn_qkv"], S.random_plain(R, seed=45), prefix="lora_unet_")
             + S.place(m, ["transformer_blocks_0_attn_to_q"], S.random_plain(R, seed=46)))
    targets = [p.bound for p in placed + twice]
    assert len({t.module for t in targets if t.module == "double_blocks.0.img_attn.qkv"}) == 1
    schedule = sched.Schedule(max_rank=R)
    per_layer = _sample(patcher.apply_tlora(m, targets, schedule, 0.9, "layers"), cond)
    rewrites, attached = _spy(monkeypatch)
    merged = _sample(patcher.apply_tlora(m, targets, schedule, 0.9, "merged", merge=True), cond)
    monkeypatch.undo()
    assert rewrites and not attached  # merged into the weights, no hooks
    base = _sample(m, cond)
    assert S.rel_err(merged, per_layer, base) < 1e-5
    without = _sample(patcher.apply_tlora(m, [p.bound for p in placed], schedule, 0.9, "once", merge=True), cond)
    assert S.rel_err(without, per_layer, base) > 1e-2  # the overlapping adapters matter
    assert _unchanged(m, before)
