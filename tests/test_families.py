"""Every model family SimpleTuner trains T-LoRA for, exact on a tiny real ComfyUI model.

For each family (``devkit.families``): a tiny diffusers model and the ComfyUI model with the same
weights; a LyCORIS ``tlora`` file saved the way SimpleTuner saves it, on the diffusers model, with
SimpleTuner's documented generic preset and with the family's own attention / feed-forward
classes; loaded through the T-LoRA Loader with no schedule input. At six noise levels the one-step
output must equal the model with lycoris-lora's own masked delta (``set_timestep_mask`` +
``get_diff_weight`` at the rank SimpleTuner's formula gives for that noise level) merged into the
diffusers weights, carried to ComfyUI's layout by the kit's conversion (ComfyUI's or diffusers'
own, never the pack's name maps) and merged by ComfyUI as a weight patch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # importlib import mode: make the support module importable
import patcher_support as S  # noqa: E402
from devkit import families as F  # noqa: E402
from devkit import tlora_files as tf  # noqa: E402
from devkit.host import pack_module  # noqa: E402

RANK, MIN_RANK, TLORA_ALPHA, STRENGTH = 8, 2, 1.5, 1.0
TOL = 1e-3

pytestmark = pytest.mark.usefixtures("single_threaded")

CASES = [pytest.param(k.family, preset, id=f"{k.family}-{preset}") for k in F.kits() for preset in k.presets]


def simpletuner_rank(t: float, T: int = 1000) -> int:
    """lycoris-lora's compute_timestep_mask as SimpleTuner calls it: int(t), then the formula."""
    u = min(max((T - int(t)) / T, 0.0), 1.0)
    return min(RANK, int(math.floor(u ** TLORA_ALPHA * (RANK - MIN_RANK))) + MIN_RANK)


def separate_spectra_(root: torch.nn.Module, seed: int = 5, decay: float = 0.9, keep: tuple = ()) -> None:
    """Every Linear weight gets well separated singular values (random singular vectors): the base
    terms lycoris-lora took by SVD are then defined at every mask boundary, as for trained weights.
    Modules under the path prefixes ``keep`` (``Kit.keep_init``) keep their weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in sorted(root.named_modules(), key=lambda kv: kv[0]):
            if isinstance(mod, torch.nn.Linear) and not name.startswith(keep):
                o, i = mod.weight.shape
                k = min(o, i)
                u = torch.linalg.qr(torch.randn(o, k, generator=gen, dtype=torch.float64))[0]
                v = torch.linalg.qr(torch.randn(i, k, generator=gen, dtype=torch.float64))[0]
                s = 1.5 * decay ** torch.arange(k, dtype=torch.float64)
                mod.weight.copy_(((u * s) @ v.t()).float())


def lycoris_deltas(lfile, root, rank: int) -> dict:
    """diffusers weight key -> lycoris-lora's own delta of that module with ``rank`` ranks on."""
    from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask

    path_of = {id(m): n for n, m in root.named_modules()}
    mask = torch.zeros(1, RANK)
    mask[:, :rank] = 1
    set_timestep_mask(mask)
    try:
        return {path_of[id(m.org_module[0])] + ".weight": m.get_diff_weight()[0].detach().float()
                for m in lfile.modules.values()}
    finally:
        clear_timestep_mask()


@pytest.mark.parametrize("family,preset", CASES)
def test_simpletuner_file_is_exact_at_six_noise_levels(family, preset, loras):
    kit = F.kit(family)
    if not F.runs_here(kit):
        pytest.skip(f"ComfyUI {'.'.join(map(str, F.host_version()))} has no {family} model")
    pair = F.build(kit, seed=11, prepare=lambda m: separate_spectra_(m, keep=kit.keep_init))
    base_sd = {k: v.detach().clone() for k, v in pair.diffusers_model.state_dict().items()}
    lfile = tf.write_simpletuner(pair.diffusers_model, loras / f"{family}.safetensors", kit.presets[preset],
                                 rank=RANK, alpha=RANK / 2, min_rank=MIN_RANK, tlora_alpha=TLORA_ALPHA, seed=3)
    loaded, info = pack_module("nodes.loader").TLoraLoader.execute(pair.model, f"{family}.safetensors", STRENGTH).args
    assert f"modules: {len(lfile.modules)} matched, 0 not matched" in info.splitlines(), info

    base_comfy = pair.comfy_state_dict(base_sd)
    pos, neg = F.conditioning(kit)
    latent = F.latent(kit)
    ms = pair.model.model.model_sampling
    ranks = []
    for sigma in kit.sigmas(pair.model):
        rank = simpletuner_rank(kit.simpletuner_t(ms, sigma))
        ranks.append(rank)
        merged = dict(base_sd)
        for key, delta in lycoris_deltas(lfile, pair.diffusers_model, rank).items():
            merged[key] = base_sd[key] + STRENGTH * delta
        comfy_merged = pair.comfy_state_dict(merged)
        patches = {f"diffusion_model.{k}": ("diff", (comfy_merged[k] - base_comfy[k],))
                   for k in base_comfy if not torch.equal(comfy_merged[k], base_comfy[k])}
        ref = pair.model.clone()
        assert len(ref.add_patches(patches, 1.0)) == len(patches) > 0
        base = S.denoise_once(pair.model, sigma, pos, neg, latent)
        want = S.denoise_once(ref, sigma, pos, neg, latent)
        got = S.denoise_once(loaded, sigma, pos, neg, latent)
        assert S.rel_err(got, want, base) < TOL, (family, preset, sigma, rank)
    assert len(set(ranks)) >= kit.min_masks, ranks  # the noise levels cover several masks
