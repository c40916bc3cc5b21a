"""Multi-GPU sampling (ComfyUI >= 0.28: ``MultiGPU_WorkUnits``): every device's model copy gets the
T-LoRA, from its own thread, with its own call state.

ComfyUI runs each device's share of a sampling step (with CFG: cond on one device, uncond on the
other) in a thread of its own, calling the main model's ``model_function_wrapper`` with that
device's model copy. Here the second "device" is ``cpu:0``, a model copy registered the way
``comfy.multigpu.create_multigpu_deepclones`` registers one; the reference is the same sampling on
one device. Skipped on hosts without multi-GPU sampling.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # importlib import mode: make the support module importable
import patcher_support as S  # noqa: E402
from devkit.host import pack_module  # noqa: E402

patcher = pack_module("comfy_glue.patcher")
sched = pack_module("tlora_core.schedule")

R = 8
pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def two_devices(comfy):
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher.ModelPatcher, "match_multigpu_clones"):
        pytest.skip("this ComfyUI has no multi-GPU sampling")
    from devkit.families import comfy_model, flux
    from devkit.tiny_models import flux_conditioning, tiny_flux

    one = tiny_flux(seed=2)
    sd = one.model.diffusion_model.state_dict()
    main = comfy_model(sd, "Flux", flux.KIT.detection_fix)
    copy = comfy_model(sd, "Flux", flux.KIT.detection_fix)
    dev2 = torch.device("cpu", 0)
    second = comfy.model_patcher.ModelPatcher(copy.model, dev2, torch.device("cpu"))
    second.clone_base_uuid = main.clone_base_uuid
    second.is_multigpu_base_clone = True
    second.cached_patcher_init = None
    main.set_additional_models("multigpu", [second])
    main.model_options["multigpu_options"] = {main.load_device: {"relative_speed": 1.0}, dev2: {"relative_speed": 1.0}}
    placed = S.place(one, S.FLUX_LAYERS, S.random_plain(R, seed=61))
    return one, main, second, [p.bound for p in placed], flux_conditioning()


def _sample(model, cond):
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, 3, 3.0, "euler", "simple", cond[0], cond[1], latent, disable_pbar=True, seed=0)


@pytest.mark.parametrize("merge", [False, True], ids=["per-layer", "merge"])
def test_every_device_copy_gets_the_tlora_from_its_own_thread(two_devices, merge):
    one, main, second, targets, cond = two_devices
    schedule = sched.Schedule(max_rank=R)
    want = _sample(patcher.apply_tlora(one, targets, schedule, 1.0, "one device", merge=merge), cond)
    base = _sample(one, cond)

    seen = []
    real = patcher.LayerHooks._add

    def spy(self, entries, state, x, output):
        seen.append((threading.current_thread().name, x.device))
        return real(self, entries, state, x, output)

    tl = patcher.apply_tlora(main, targets, schedule, 1.0, "two devices", merge=merge)
    patcher.LayerHooks._add = spy
    try:
        got = _sample(tl, cond)
    finally:
        patcher.LayerHooks._add = real
    assert S.rel_err(got, want, base) < 1e-5
    if not merge:
        assert len({thread for thread, _ in seen}) == 2  # each device's thread ran its own layers' hooks
    (patch,) = patcher.tlora_patches(tl)
    assert patch.runs == [] and S.hooks_left(main) == 0 and S.hooks_left(second) == 0
    assert all(torch.equal(a, b) for a, b in zip(main.model.state_dict().values(), second.model.state_dict().values()))
