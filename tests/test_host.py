"""The foundation: a real ComfyUI host runs here, in-process and as a server, with the pack loaded."""

import subprocess
import sys

import torch

from devkit.host import ROOT


def test_core_imports_without_comfyui():
    code = (
        "import sys; sys.path.insert(0, %r); import tlora_core.schedule, tlora_core.adapter;"
        "assert not any(m == 'comfy' or m.startswith('comfy.') or m.startswith('comfy_') for m in sys.modules), sorted(sys.modules)"
        % str(ROOT)
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _sample(model, positive, negative, latent, steps=3, cfg=2.0, sampler="euler", scheduler="simple"):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               disable_pbar=True, seed=0)


def test_tiny_flux_samples_deterministically(comfy, tiny_flux):
    from devkit.tiny_models import flux_conditioning, tiny_flux as make

    pos, neg = flux_conditioning()
    latent = torch.zeros(1, 16, 8, 8)
    a = _sample(tiny_flux, pos, neg, latent)
    b = _sample(make(seed=0), pos, neg, latent)
    c = _sample(make(seed=1), pos, neg, latent)
    assert a.shape == latent.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert isinstance(tiny_flux.model.model_sampling, comfy.model_sampling.CONST)


def test_tiny_sdxl_samples(comfy, tiny_sdxl):
    from devkit.tiny_models import sdxl_conditioning

    pos, neg = sdxl_conditioning()
    out = _sample(tiny_sdxl, pos, neg, torch.zeros(1, 4, 8, 8))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert isinstance(tiny_sdxl.model.model_sampling, comfy.model_sampling.EPS)


def test_server_loads_pack(comfy_server):
    stats = comfy_server.get("/system_stats")
    assert stats["system"]["comfyui_version"]
    pack_lines = [line for line in comfy_server.log().splitlines() if "custom_nodes/ComfyUI-TLoRA" in line]
    assert pack_lines, comfy_server.log()
    assert not any("IMPORT FAILED" in line for line in pack_lines), comfy_server.log()
