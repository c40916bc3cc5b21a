"""The T-LoRA trainers of 2026, exact from their own sources: the Anima kohya fork (kaiming,
orthogonal, layer_orthogonal), takenoko (lora, ortho_lora with its mixed file, ortho_from_layer) and
Fizgig (Krea 2). Each file is written as that trainer's save code writes it (devkit.tlora_files, bf16
tensors), loaded by the T-LoRA Loader node with no schedule input, on a tiny real ComfyUI model of
the trainer's family (devkit.trainer_models), and its one-step CFG output at six noise levels must
equal ComfyUI's own merge of the delta the trainer's forward defines at that step:

- the rank rule as each trainer computes it, from the timestep it feeds its mask (written out
  below from its source, not taken from the pack);
- the module's delta from the raw file tensors (bf16, upcast), scale alpha / R, merged by ComfyUI
  as a weight patch.

Also: the loader's info names the trainer and the family, ``mask="all ranks"`` is the full-rank
LoRA (the Anima fork's own ``_comfy`` export, loaded by ComfyUI), the ``_comfy`` sibling and
LyCORIS' rank-2r exports are refused with a pointer to ComfyUI's LoraLoader, a takenoko file
without its embedded config falls back to takenoko's defaults with a note.

Krea 2 (Fizgig) exists in ComfyUI 0.28 and later only; its native names (``blocks.N.attn.wq``) are
no layer of Flux, so on older hosts only the format tests (tests/test_formats.py) run for Fizgig.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # importlib import mode: make the support module importable
import patcher_support as S  # noqa: E402
from devkit import tlora_files as tf  # noqa: E402
from devkit import trainer_models as TM  # noqa: E402
from devkit.host import pack_module  # noqa: E402

loader = pack_module("nodes.loader")
TLoRAFormatError = pack_module("tlora_core.formats").TLoRAFormatError

pytestmark = pytest.mark.usefixtures("single_threaded")

STRENGTH = 0.9
TOL = 1e-3
ANIMA_SIGMAS = [0.99, 0.8, 0.6, 0.4, 0.2, 0.05]
TAKENOKO_SIGMAS = [0.99, 0.95, 0.9, 0.88, 0.6, 0.2]  # four above takenoko's boundary 875/1000, two below
FIZGIG_SIGMAS = [0.97, 0.8335, 0.62, 0.41, 0.2, 0.04]  # 0.8335: int(833.5) and 833.5 give different ranks


# --- the trainers' rank rules, from their sources ---------------------------------------------------
def anima_rank(t: float, R: int, r_min: int, a: float, T: float = 1.0) -> int:
    """sd-scripts fork, networks/lora_tlora_anima.py ``TLoRANetwork._unet_forward_pre_hook`` with
    networks/tlora_utils.py ``build_rank_mask``: R is the module's own rank, min_rank clamped to it."""
    r_min = min(max(r_min, 1), R)
    r = int(((T - t) / T) ** a * (R - r_min)) + r_min
    return max(r_min, min(r, R))


def takenoko_rank(t: float, R: int, r_min: int, a: float, boundary: int, T: int = 1000) -> int:
    """takenoko src/networks/t_lora.py ``update_rank_mask_from_timesteps``."""
    if t > boundary:
        frac = max(0.0, min(1.0, 1.0 - (t - boundary) / max(1, T - boundary))) ** a
    else:
        frac = 1.0
    return int(max(0, min(R, math.floor(frac * (R - r_min) + r_min))))


def fizgig_rank(t: float, R: int, r_min: int) -> int:
    """Fizgig src/fizgig/networks/lora.py ``tlora_rank_mask`` (``TLoRAModule`` clamps min_rank to [1, R])."""
    r_min = max(1, min(int(r_min), R))
    ts = int(float(t) * 1000)
    r = int(((1000 - ts) / 1000) * (R - r_min)) + r_min
    return max(r_min, min(R, r))


def f32(sigma: float) -> float:
    """The sigma the model is evaluated at (ComfyUI's float32 sigmas)."""
    return float(torch.tensor(sigma, dtype=torch.float32))


def dit_timestep(model, sigma: float) -> float:
    """What ComfyUI passes the DiT as its time (the Anima fork's and Fizgig's hooks read that)."""
    ms = model.get_model_object("model_sampling")
    t = float(ms.timestep(torch.tensor([f32(sigma)]))[0])
    assert t == pytest.approx(f32(sigma), abs=1e-7), "Anima and Krea 2 are sampled with t = sigma"
    return t


# --- the deltas, from the raw file tensors --------------------------------------------------------
def raw_modules(path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for key, v in load_file(str(path)).items():
        name, _, suffix = key.partition(".")
        out.setdefault(name, {})[suffix] = v
    return out


def weight_keys(model, prefix: str) -> dict:
    """``<prefix><native path with _>`` -> (ComfyUI weight key, its shape), from the model's own state
    dict: linear and 2-D convolution weights."""
    return {prefix + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): (k, v.shape)
            for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim in (2, 4)}


def module_delta(t: dict, r: int) -> torch.Tensor:
    """The trainer's forward as a weight delta with the first r ranks on, scale alpha / R:
    plain ``up diag(m) down``, orthogonal ``P diag(lambda m) Q - P0 diag(lambda0 m) Q0`` (a module with
    q_layer is orthogonal, its lora_down / lora_up unused: takenoko saves them anyway). On a conv, a
    down conv then a 1x1 up conv compose to ``up diag(m) down`` on the kernels flattened to
    (in * kh * kw): the delta is that, reshaped to the layer's weight by the caller."""
    d = {k: v.double().flatten(1) if v.ndim == 4 else v.double() for k, v in t.items()}
    if "q_layer.weight" in d:
        q, p, lam = d["q_layer.weight"], d["p_layer.weight"], d["lambda_layer"].reshape(-1)
        q0, p0 = d["base_q.weight"], d["base_p.weight"]
        lam0 = d["base_lambda_buf" if "base_lambda_buf" in d else "base_lambda"].reshape(-1)
        R = q.shape[0]
        delta = (p[:, :r] * lam[:r]) @ q[:r] - (p0[:, :r] * lam0[:r]) @ q0[:r]
    else:
        down, up = d["lora_down.weight"], d["lora_up.weight"]
        R = down.shape[0]
        delta = up[:, :r] @ down[:r]
    return float(d["alpha"]) / R * delta


def file_deltas(model, path, prefix: str):
    """``rank_of`` -> each module's delta with ``rank_of(R)`` ranks on, R being that module's rank (an
    int: that many ranks on in every module)."""
    keys = weight_keys(model, prefix)
    mods = raw_modules(path)
    assert set(mods) <= set(keys), sorted(set(mods) - set(keys))[:3]

    def deltas(rank_of):
        r_of = rank_of if callable(rank_of) else (lambda R: rank_of)
        return {keys[name][0]: module_delta(t, r_of(module_delta_rank(t))).reshape(keys[name][1])
                for name, t in mods.items()}

    return deltas


def merged(model, deltas: dict):
    """ComfyUI's own weight patching of ``diff`` patches (what its LoRA loader does after parsing)."""
    m = model.clone()
    patches = {k: ("diff", (d.float(),)) for k, d in deltas.items()}
    assert len(m.add_patches(patches, STRENGTH)) == len(patches)
    return m


# --- models -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def anima(comfy):
    return dict(model=TM.tiny_anima(seed=2), cond=TM.anima_conditioning(), latent=torch.zeros(1, 16, 1, 8, 8),
                family="Anima (Anima)" if TM.has_anima() else "Cosmos-Predict2 (CosmosT2IPredict2)")


@pytest.fixture(scope="module")
def wan(comfy):
    return dict(model=TM.tiny_wan(seed=3), cond=TM.wan_conditioning(), latent=torch.zeros(1, 16, 3, 8, 8),
                family="Wan 2.x (WAN21_T2V)")


@pytest.fixture(scope="module")
def krea2(comfy):
    if not TM.has_krea2():
        pytest.skip("this ComfyUI has no Krea 2 (0.28+); Fizgig's native Krea 2 names are no layer of Flux: "
                    "only its format is tested here (test_formats)")
    return dict(model=TM.tiny_krea2(seed=4), cond=TM.krea2_conditioning(), latent=torch.zeros(1, 16, 8, 8),
                family="Krea 2 (Krea2)")


def base_output(env, sigma):
    """The model's own output at sigma (kept with the module's model)."""
    cache = env.setdefault("base", {})
    if sigma not in cache:
        cache[sigma] = S.denoise_once(env["model"], sigma, *env["cond"], env["latent"])
    return cache[sigma]


def put(loras, path) -> str:
    (loras / Path(path).name).write_bytes(Path(path).read_bytes())
    return Path(path).name


def check_exact(env, loras, path, prefix: str, rank_at, sigmas, fmt: str):
    """The loader's output (no schedule input) against the trainer's delta, each module with
    ``rank_at(sigma, R)`` ranks on, R its own rank (the kohya-style trainers mask each module by its
    own rank)."""
    m, (pos, neg), latent = env["model"], env["cond"], env["latent"]
    name = put(loras, path)
    out, info = loader.TLoraLoader.execute(m, name, STRENGTH).args
    delta = file_deltas(m, path, prefix)
    n_modules = len(raw_modules(path))
    # the trainers' native names are ComfyUI's own: its generic key map knows every one as lora_unet_<path>
    comfy_keys = S.model_keys(m)
    assert all("lora_unet_" + n[len(prefix):] in comfy_keys for n in raw_modules(path))
    lines = info.splitlines()
    assert lines[1].startswith(f"format: {fmt}"), lines[1]
    assert lines[2].startswith(f"model: {env['family']}; "), lines[2]
    assert lines[3] == f"modules: {n_modules} matched, 0 not matched", lines[3]
    R = max(module_delta_rank(t) for t in raw_modules(path).values())
    ranks, refs, errors = [], [], []
    for sigma in sigmas:
        r = rank_at(sigma, R)
        refs.append(S.denoise_once(merged(m, delta(lambda R_m, s=sigma: rank_at(s, R_m))), sigma, pos, neg, latent))
        errors.append(S.rel_err(S.denoise_once(out, sigma, pos, neg, latent), refs[-1], base_output(env, sigma)))
        ranks.append(r)
    assert len(set(ranks)) >= 3 and min(ranks) < R, ranks
    assert all(e < TOL for e in errors), (ranks, errors, info)
    # the check can fail: at the lowest rank, the unmasked adapter is far from the trainer's output
    i = ranks.index(min(ranks))
    full = S.denoise_once(merged(m, delta(R)), sigmas[i], pos, neg, latent)
    assert S.rel_err(full, refs[i], base_output(env, sigmas[i])) > 100 * TOL
    assert S.hooks_left(m) == 0
    return out, info, ranks


def module_delta_rank(t: dict) -> int:
    return (t["q_layer.weight"] if "q_layer.weight" in t else t["lora_down.weight"]).shape[0]


# --- Anima kohya fork -------------------------------------------------------------------------------
ANIMA_CASES = {
    "kaiming": dict(rank=8, alpha=4.0, min_rank=1, alpha_rank_scale=1.0),
    "orthogonal": dict(rank=8, alpha=8.0, min_rank=2, alpha_rank_scale=2.0),
    "layer_orthogonal": dict(rank=8, alpha=4.0, min_rank=1, alpha_rank_scale=1.0, sig_type="last"),
}


@pytest.mark.parametrize("init", list(ANIMA_CASES))
def test_anima_fork_is_exact(anima, loras, tmp_path, init):
    cfg = ANIMA_CASES[init]
    path = tf.write_anima(anima["model"], tmp_path / f"anima_{init}.safetensors", init=init, seed=5, **cfg)
    m = anima["model"]

    def rank_at(sigma, R):
        return anima_rank(dit_timestep(m, sigma), R, cfg["min_rank"], cfg["alpha_rank_scale"], T=1.0)

    layout = "plain" if init == "kaiming" else "orthogonal, stored base"
    _, info, _ = check_exact(anima, loras, path, "lora_unet_", rank_at, ANIMA_SIGMAS,
                             f"T-LoRA kohya fork (orangemagic123/sd-scripts) for Anima, {layout} ({init})")
    assert "t = T * sigma (flow matching), T = 1" in info.splitlines()[2]
    assert "  max_timestep = 1  (file metadata ss_tlora_*)" in info.splitlines()
    assert "note: the fork's own inference runs every rank" in info


def test_anima_fork_masks_each_module_by_its_own_rank(anima, loras, tmp_path, caplog):
    """The fork's per-type dims (cross_attn_dim 4, mlp_dim 16 beside rank 8): each module's mask is
    built from its own rank (``build_rank_mask(progress, module rank)``), not one mask of the largest
    rank cut to each module (LyCORIS' rule); per layer and merged alike."""
    m, (pos, neg), latent = anima["model"], anima["cond"], anima["latent"]
    path = tf.write_anima(m, tmp_path / "anima_dims.safetensors", init="kaiming", rank=8, alpha=4.0, min_rank=2,
                          type_dims={"cross_attn": 4, "mlp": 16}, seed=9)
    assert {module_delta_rank(t) for t in raw_modules(path).values()} == {4, 8, 16}

    def rank_at(sigma, R):
        return anima_rank(dit_timestep(m, sigma), R, 2, 1.0, T=1.0)

    _, info, _ = check_exact(anima, loras, path, "lora_unet_", rank_at, ANIMA_SIGMAS,
                             "T-LoRA kohya fork (orangemagic123/sd-scripts) for Anima, plain (kaiming)")
    assert "note: modules have different ranks [4, 8, 16]: each module's mask is computed from its own rank" in info
    assert "  per_module_rank = True  (the fork's convention (t = sigma, not truncated))" in info.splitlines()
    assert "says rank 8" not in info  # ss_network_dim is the rank of most modules, not a mismatch
    for R in (16, 8, 4):  # the info's table, one line per module rank, is the fork's rule
        table = ", ".join(f"{t:g}: {anima_rank(t, R, 2, 1.0)}" for t in (0, 0.25, 0.5, 0.75, 0.999))
        assert f"active rank at t (modules of rank {R}): {table}" in info.splitlines(), info
    merged_out, _ = loader.TLoraLoader.execute(m, put(loras, path), STRENGTH, apply="merge").args
    delta = file_deltas(m, path, "lora_unet_")
    sigma = 0.6  # t = 0.6: ranks 2 / 4 / 7 for modules of rank 4 / 8 / 16; the shared rule gives 4 / 7 / 7
    base = base_output(anima, sigma)
    own = S.denoise_once(merged(m, delta(lambda R: rank_at(sigma, R))), sigma, pos, neg, latent)
    shared = S.denoise_once(merged(m, delta(lambda R: min(rank_at(sigma, 16), R))), sigma, pos, neg, latent)
    assert S.rel_err(S.denoise_once(merged_out, sigma, pos, neg, latent), own, base) < TOL
    assert not [r for r in caplog.records if "merge mode not possible" in r.getMessage()]
    assert S.rel_err(shared, own, base) > 100 * TOL
    assert S.hooks_left(m) == 0


def test_all_ranks_is_the_forks_own_full_rank_lora(anima, loras, tmp_path):
    """mask="all ranks": every rank at every step, which is the fork's own ``_comfy`` export loaded
    by ComfyUI (here in fp32, ``--save_precision float``: the export's bf16 products would round)."""
    m, (pos, neg), latent = anima["model"], anima["cond"], anima["latent"]
    path = tf.write_anima(m, tmp_path / "anima_all.safetensors", init="orthogonal", rank=8, alpha=8.0,
                          min_rank=1, dtype=torch.float32, seed=6)
    name = put(loras, path)
    out, info = loader.TLoraLoader.execute(m, name, STRENGTH, mask="all ranks").args
    from safetensors.torch import load_file

    sibling = S.comfy_merge(m, load_file(str(tf.anima_comfy_sibling_path(path))), STRENGTH)  # ComfyUI's LoraLoader
    full = merged(m, file_deltas(m, path, "lora_unet_")(8))
    for sigma in (0.99, 0.5):
        base = base_output(anima, sigma)
        got = S.denoise_once(out, sigma, pos, neg, latent)
        assert S.rel_err(got, S.denoise_once(full, sigma, pos, neg, latent), base) < TOL
        assert S.rel_err(got, S.denoise_once(sibling, sigma, pos, neg, latent), base) < TOL
    assert "  min_rank = 8  (T-LoRA Loader mask: all ranks)" in info.splitlines()


# --- the fork's SD / SDXL network (networks/lora_tlora.py), with its convolutions --------------------
SD_TIMESTEPS = [999.0, 800.0, 600.0, 400.0, 200.0, 20.0]


@pytest.fixture(scope="module")
def sdxl(comfy):
    from devkit.tiny_models import sdxl_conditioning, tiny_sdxl

    m = tiny_sdxl(seed=5)
    sigmas = [float(m.model.model_sampling.sigma(torch.tensor(t))) for t in SD_TIMESTEPS]
    return dict(model=m, cond=sdxl_conditioning(), latent=torch.zeros(1, 4, 8, 8), family="Stable Diffusion UNet (SD 1.x / 2.x / SDXL) (SDXL)",
                sigmas=sigmas)


def sd_fork_rank(model, sigma: float, R: int, r_min: int, a: float) -> int:
    """The fork's rule on the UNet's integer timestep (``_unet_forward_pre_hook``), T = 1000."""
    t = float(model.get_model_object("model_sampling").timestep(torch.tensor([f32(sigma)]))[0])
    return anima_rank(float(int(t)), R, r_min, a, T=1000.0)


@pytest.mark.parametrize("init", ["kaiming", "orthogonal"])
def test_sd_fork_with_convolutions_is_exact(sdxl, loras, tmp_path, init, caplog):
    """conv_dim: the ResNet / down / up blocks' 3x3 convs at rank 4 (their lora_down a conv with the
    layer's kernel and stride, lora_up 1x1; orthogonal: q_layer flattened), Linears and 1x1 convs at
    rank 8, each masked by its own rank; per layer and merged."""
    m, (pos, neg), latent = sdxl["model"], sdxl["cond"], sdxl["latent"]
    path = tf.write_sd_fork(m, tmp_path / f"sd_{init}.safetensors", init=init, rank=8, alpha=4.0, conv_dim=4,
                            conv_alpha=2.0, min_rank=1, alpha_rank_scale=1.5, seed=10)
    raw = raw_modules(path)
    convs = [n for n, t in raw.items() if n.endswith(("in_layers_2", "out_layers_3", "_op", "_conv"))]
    assert len(convs) >= 10 and {module_delta_rank(raw[n]) for n in convs} == {4}

    def rank_at(sigma, R):
        return sd_fork_rank(m, sigma, R, 1, 1.5)

    layout = "plain" if init == "kaiming" else "orthogonal, stored base"
    _, info, _ = check_exact(sdxl, loras, path, "lora_unet_", rank_at, sdxl["sigmas"],
                             f"T-LoRA kohya fork (orangemagic123/sd-scripts) for SD / SDXL, {layout} ({init})")
    assert "each module's mask is computed from its own rank" in info and "convolution" not in info
    merged_out, _ = loader.TLoraLoader.execute(m, put(loras, path), STRENGTH, apply="merge").args
    delta = file_deltas(m, path, "lora_unet_")
    for sigma in sdxl["sigmas"][1:3]:
        ref = S.denoise_once(merged(m, delta(lambda R, s=sigma: rank_at(s, R))), sigma, pos, neg, latent)
        got = S.denoise_once(merged_out, sigma, pos, neg, latent)
        assert S.rel_err(got, ref, base_output(sdxl, sigma)) < TOL
    assert not [r for r in caplog.records if "merge mode not possible" in r.getMessage()]
    assert S.hooks_left(m) == 0


def test_sd_fork_convolutions_match_comfyuis_own_conv_lora(sdxl, loras, tmp_path):
    """The same plain file, each module's inactive ranks zeroed in lora_up, loaded by ComfyUI's own
    LoRA loader (its conv LoRA maths): the T-LoRA equals it at that noise level."""
    m, (pos, neg), latent = sdxl["model"], sdxl["cond"], sdxl["latent"]
    path = tf.write_sd_fork(m, tmp_path / "sd_comfy.safetensors", rank=8, alpha=4.0, conv_dim=4, conv_alpha=2.0,
                            min_rank=1, alpha_rank_scale=1.0, dtype=torch.float32, seed=11)
    out, _ = loader.TLoraLoader.execute(m, put(loras, path), STRENGTH).args
    from safetensors.torch import load_file

    sigma = sdxl["sigmas"][2]
    lora = load_file(str(path))
    for key, up in list(lora.items()):
        if key.endswith(".lora_up.weight"):
            up = up.clone()
            up[:, sd_fork_rank(m, sigma, up.shape[1], 1, 1.0):] = 0
            lora[key] = up
    ref = S.denoise_once(S.comfy_merge(m, lora, STRENGTH), sigma, pos, neg, latent)
    assert S.rel_err(S.denoise_once(out, sigma, pos, neg, latent), ref, base_output(sdxl, sigma)) < TOL


def test_sd1_fork_file_with_diffusers_names_matches_comfyuis_own_conv_lora(comfy, loras, tmp_path):
    """SD 1.x: the fork names layers as diffusers does (``down_blocks_0_resnets_0_conv1``, 1x1
    ``proj_in`` convs); ComfyUI's key map places them. Against ComfyUI's own LoRA loader of the same
    file with each module's inactive ranks zeroed, at three noise levels."""
    from devkit import families as F
    from safetensors.torch import load_file

    pair = F.build(F.kit("sd1x"), seed=6)
    m, (pos, neg), latent = pair.model, F.conditioning(pair.kit), F.latent(pair.kit)
    path = tf.write_sd_fork(pair.diffusers_model, tmp_path / "sd1.safetensors", rank=8, alpha=4.0, conv_dim=4,
                            conv_alpha=2.0, min_rank=2, dtype=torch.float32, base_model_version="sd_v1", seed=12)
    lora = load_file(str(path))
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in lora
    assert any(k.endswith("proj_in.lora_down.weight") and v.shape[2:] == (1, 1) for k, v in lora.items())
    out, info = loader.TLoraLoader.execute(m, put(loras, path), STRENGTH).args
    assert f"modules: {len(raw_modules(path))} matched, 0 not matched" in info
    ranks = set()
    for t in (900.0, 500.0, 100.0):
        sigma = float(m.model.model_sampling.sigma(torch.tensor(t)))
        masked = dict(lora)
        for key, up in lora.items():
            if key.endswith(".lora_up.weight"):
                r = sd_fork_rank(m, sigma, up.shape[1], 2, 1.0)
                masked[key] = torch.cat([up[:, :r], torch.zeros_like(up[:, r:])], 1)
                ranks.add(r)
        base = S.denoise_once(m, sigma, pos, neg, latent)
        ref = S.denoise_once(S.comfy_merge(m, masked, STRENGTH), sigma, pos, neg, latent)
        assert S.rel_err(S.denoise_once(out, sigma, pos, neg, latent), ref, base) < TOL, t
    assert len(ranks) >= 4, ranks


# --- takenoko ---------------------------------------------------------------------------------------
TAKENOKO_CASES = {
    "lora": dict(trainer_type="lora", rank=16, alpha=8.0, min_rank=1, tlora_alpha=1.0, boundary=875),
    "ortho_lora": dict(trainer_type="ortho_lora", rank=16, alpha=16.0, min_rank=2, tlora_alpha=1.5, boundary=875),
    "ortho_from_layer": dict(trainer_type="ortho_lora", ortho_from_layer=True, rank=16, alpha=8.0, min_rank=1,
                             tlora_alpha=1.0, boundary=875),
}
TAKENOKO_LAYOUTS = {"lora": "plain", "ortho_lora": "8 orthogonal and 2 plain modules",
                    "ortho_from_layer": "orthogonal, stored base"}


@pytest.mark.parametrize("case", list(TAKENOKO_CASES))
def test_takenoko_is_exact(wan, loras, tmp_path, case):
    cfg = TAKENOKO_CASES[case]
    path = tf.write_takenoko(wan["model"], tmp_path / f"takenoko_{case}.safetensors", seed=7, **cfg)
    mods = raw_modules(path)
    if case == "ortho_lora":  # random ortho init: the non-square ffn layers stayed plain
        plain = sorted(n for n, t in mods.items() if "q_layer.weight" not in t)
        assert plain == [f"t_lora_unet_blocks_{b}_ffn_{i}" for b in range(2) for i in (0, 2)]
        per_block = len(mods) // 2
        layout = f"{2 * (per_block - 2)} orthogonal and {2 * 2} plain modules"
    else:
        layout = TAKENOKO_LAYOUTS[case]

    def rank_at(sigma, R):  # takenoko trains with t = 1000 * sigma + 1 (timestep_utils.py)
        return takenoko_rank(1000.0 * f32(sigma) + 1.0, R, cfg["min_rank"], cfg["tlora_alpha"], cfg["boundary"])

    _, info, ranks = check_exact(wan, loras, path, "t_lora_unet_", rank_at, TAKENOKO_SIGMAS,
                                 f"takenoko T-LoRA (Wan), {layout}")
    assert ranks[-2:] == [cfg["rank"]] * 2  # full rank at and below the boundary
    assert "  boundary_timestep = 875  (file metadata takenoko_config_content (network_args))" in info.splitlines()


def test_takenoko_without_config_uses_its_defaults(wan, loras, tmp_path):
    path = tf.write_takenoko(wan["model"], tmp_path / "takenoko_bare.safetensors", min_rank=3, tlora_alpha=2.0,
                             embed_config=False)
    _, info = loader.TLoraLoader.execute(wan["model"], put(loras, path), 1.0).args
    lines = info.splitlines()
    assert "  min_rank = 1  (takenoko defaults)" in lines and "  alpha = 1  (takenoko defaults)" in lines
    assert "  boundary_timestep = 875  (takenoko defaults)" in lines
    assert "note: the file carries no takenoko config" in info


# --- Fizgig (Krea 2) --------------------------------------------------------------------------------
def test_fizgig_is_exact(krea2, loras, tmp_path):
    path = tf.write_fizgig(krea2["model"], tmp_path / "fizgig.safetensors", min_rank=2, rank=8, alpha=8.0, seed=8)
    m = krea2["model"]
    check_exact(krea2, loras, path, "lora_unet_", lambda s, R: fizgig_rank(dit_timestep(m, s), R, 2), FIZGIG_SIGMAS,
                "Fizgig T-LoRA (krea2)")


# --- plain-LoRA exports of a T-LoRA -----------------------------------------------------------------
def test_exports_are_refused_with_a_pointer_to_loraloader(anima, wan, loras, tmp_path):
    path = tf.write_anima(anima["model"], tmp_path / "anima_x.safetensors", init="orthogonal")
    sibling = put(loras, tf.anima_comfy_sibling_path(path))
    with pytest.raises(TLoRAFormatError, match=r"_comfy export.*LoraLoader"):
        loader.TLoraLoader.execute(anima["model"], sibling, 1.0)
    mods = [f"blocks.0.self_attn.{p}" for p in "qkvo"]
    for metadata in ("sd-scripts", "simpletuner", None):
        prefix = "lycoris" if metadata == "simpletuner" else "lora_unet"
        p = tf.write_lycoris_rank2r_export(wan["model"], tmp_path / f"r2r_{metadata}.safetensors", modules=mods,
                                           metadata=metadata, prefix=prefix)
        with pytest.raises(TLoRAFormatError, match=r"rank-2r export.*LoraLoader"):
            loader.TLoraLoader.execute(wan["model"], put(loras, p), 1.0)
