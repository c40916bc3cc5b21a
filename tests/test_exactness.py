"""Exactness: the pack's T-LoRA at a noise level == ComfyUI's own merge of the adapter masked to
that level's rank (and, for LyCORIS, == lycoris-lora's own masked delta).

For a Flux-like (flow) and an SDXL-like (discrete) tiny model built from ComfyUI's classes, and
for each adapter shape (plain, ortho, LyCORIS tlora), the one-step CFG-denoised output at 5 noise
levels must match, relative to the LoRA's effect, to < 1e-3. The unmasked adapter must fail the
same check (the tests can fail).
"""

from __future__ import annotations

import math

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # importlib import mode: make the support module importable
import patcher_support as S  # noqa: E402
from devkit.host import pack_module

patcher = pack_module("comfy_glue.patcher")
sched = pack_module("tlora_core.schedule")
adapter_mod = pack_module("tlora_core.adapter")

R = 8
STRENGTH = 0.8
TOL = 1e-3


pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def models(comfy):
    from devkit.tiny_models import flux_conditioning, sdxl_conditioning, tiny_flux, tiny_sdxl

    flux, sdxl = tiny_flux(seed=0), tiny_sdxl(seed=0)
    return {
        "flux": dict(model=flux, layers=S.FLUX_LAYERS, cond=flux_conditioning(), latent=torch.zeros(1, 16, 8, 8),
                     sigmas=[1.0, 0.8, 0.55, 0.3, 0.05], alpha=1.0),
        "sdxl": dict(model=sdxl, layers=S.SDXL_LAYERS, cond=sdxl_conditioning(), latent=torch.zeros(1, 4, 8, 8),
                     sigmas=[float(sdxl.model.model_sampling.sigma(torch.tensor(t))) for t in (999.0, 750.0, 500.0, 250.0, 20.0)],
                     alpha=1.5),
    }


def _lycoris_placed(model_patcher, rank: int, alpha: float, seed: int):
    """A LyCORIS tlora network trained (perturbed) on the model's diffusers twin, and the pack's
    adapters for it with the base terms rebuilt from the ComfyUI weights (SVD), as the reader must."""
    import lycoris
    from lycoris import LycorisNetwork, create_lycoris

    from devkit.families import pair_of

    pair = pair_of(model_patcher)
    pair.sync_from_comfy()
    LycorisNetwork.apply_preset({"target_module": pair.kit.presets.get("family", pair.kit.presets["generic"])})
    with S.no_gc_collect():  # lycoris runs gc.collect() per module: seconds each in a big test process
        net = create_lycoris(pair.diffusers_model, 1.0, linear_dim=rank, linear_alpha=alpha, algo="tlora")
    g = torch.Generator().manual_seed(seed)
    keys = S.model_keys(model_patcher)
    sd = model_patcher.model.state_dict()
    placed, modules = [], {}
    with torch.no_grad():
        for mod in net.loras:
            assert isinstance(mod, lycoris.modules.tlora.TLoraModule)
            for p in (mod.q_layer.weight, mod.p_layer.weight):
                p.add_(0.2 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            mod.lambda_layer.mul_(1 + 0.5 * torch.rand(mod.lambda_layer.shape, generator=g))
            target = keys[mod.lora_name]
            key, piece = (target, None) if isinstance(target, str) else target
            w = sd[key].float()
            if piece is not None:
                w = w.narrow(piece[0], piece[1], piece[2])
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            p0, l0, q0 = u[:, :rank], s[:rank], vh[:rank]
            # the rebuilt base must be lycoris' own base (products: SVD signs are arbitrary)
            ours = (p0 * l0) @ q0
            theirs = (mod.base_p * mod.base_lambda.reshape(-1)) @ mod.base_q
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), mod.lora_name
            ad = adapter_mod.ortho(mod.lora_name, mod.p_layer.weight, mod.lambda_layer, mod.q_layer.weight,
                                   p0, l0, q0, scale=alpha / rank)
            module = key[len("diffusion_model."):-len(".weight")]
            placed.append(S.Placed(mod.lora_name, target, adapter_mod.BoundAdapter(module, (piece[1], piece[2]) if piece else None, ad)))
            modules[mod.lora_name] = mod
    assert len(placed) >= 10
    return placed, modules


def _lycoris_reference_sd(modules: dict, rank: int | None) -> dict:
    """lycoris-lora's own masked delta (set_timestep_mask + get_diff_weight) as ComfyUI ``diff`` patches."""
    from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask

    out = {}
    for name, mod in modules.items():
        mask = torch.zeros(1, mod.lora_dim)
        mask[:, : (mod.lora_dim if rank is None else rank)] = 1
        set_timestep_mask(mask)
        try:
            with torch.no_grad():
                out[name + ".diff"] = mod.get_diff_weight()[0].clone()
        finally:
            clear_timestep_mask()
    return out


def _case(models, model_name, fmt):
    c = models[model_name]
    m = c["model"]
    if fmt == "plain":
        placed = S.place(m, c["layers"], S.random_plain(R, seed=11))
        reference_sd = lambda r: S.lora_state_dict(placed, r)
    elif fmt == "ortho":
        placed = S.place(m, c["layers"], S.random_ortho(R, seed=12))
        reference_sd = lambda r: S.lora_state_dict(placed, r)
    else:
        placed, modules = _lycoris_placed(m, R, alpha=4.0, seed=13)
        reference_sd = lambda r: _lycoris_reference_sd(modules, r)
    return c, m, placed, reference_sd


def _errors(c, m, placed, reference_sd, schedule, strength=STRENGTH):
    """(rank, rel error) per noise level of the pack's T-LoRA vs ComfyUI's merge of the masked adapter."""
    pos, neg = c["cond"]
    tl = patcher.apply_tlora(m, [p.bound for p in placed], schedule, strength, "exact")
    ms = m.model.model_sampling
    out = []
    for sigma in c["sigmas"]:
        r = S.reference_rank(ms, sigma, R, 1, c["alpha"])
        base = S.denoise_once(m, sigma, pos, neg, c["latent"])
        ref = S.denoise_once(S.comfy_merge(m, reference_sd(r), strength), sigma, pos, neg, c["latent"])
        got = S.denoise_once(tl, sigma, pos, neg, c["latent"])
        out.append((r, S.rel_err(got, ref, base)))
    assert S.hooks_left(m) == 0
    return out


@pytest.mark.parametrize("fmt", ["plain", "ortho", "lycoris"])
@pytest.mark.parametrize("model_name", ["flux", "sdxl"])
def test_masked_tlora_equals_comfy_merge_of_masked_adapter(models, model_name, fmt):
    c, m, placed, reference_sd = _case(models, model_name, fmt)
    schedule = sched.Schedule(max_rank=R, min_rank=1, alpha=c["alpha"])
    errors = _errors(c, m, placed, reference_sd, schedule)
    ranks = [r for r, _ in errors]
    assert len(set(ranks)) >= 4 and min(ranks) < R, ranks  # the levels really exercise the mask
    assert all(e < TOL for _, e in errors), errors

    # negative control: the same adapter unmasked (all ranks at every level) must fail the check
    unmasked = sched.Schedule(max_rank=R, min_rank=R, alpha=c["alpha"])
    bad = _errors(c, m, placed, reference_sd, unmasked)
    assert all(e > 100 * TOL for r, e in bad if r < R), bad


def test_negative_strength_matches_merge(models):
    c, m, placed, reference_sd = _case(models, "flux", "ortho")
    c = dict(c, sigmas=c["sigmas"][1:4])
    errors = _errors(c, m, placed, reference_sd, sched.Schedule(max_rank=R, alpha=c["alpha"]), strength=-0.6)
    assert all(e < TOL for _, e in errors), errors


def test_zero_strength_is_the_base_model_exactly(models):
    c, m, placed, _ = _case(models, "sdxl", "plain")
    pos, neg = c["cond"]
    tl = patcher.apply_tlora(m, [p.bound for p in placed], sched.Schedule(max_rank=R), 0.0, "zero")
    for sigma in c["sigmas"][:2]:
        assert torch.equal(S.denoise_once(tl, sigma, pos, neg, c["latent"]), S.denoise_once(m, sigma, pos, neg, c["latent"]))
