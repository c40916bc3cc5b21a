"""read_tlora on real files written in each trainer's layout (devkit.tlora_files: lycoris-lora's own
create_lycoris + save_weights, safetensors / torch.save with the official key layouts), and on bad
input. Deltas are checked against the formulas written out here from the raw tensors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devkit import tlora_files as tf
from devkit.host import pack_module

formats = pack_module("tlora_core.formats")
schedule_mod = pack_module("tlora_core.schedule")
TLoRAFormatError = formats.TLoRAFormatError
SvdBaseTerms = formats.SvdBaseTerms


def raw(path):
    path = str(path)
    if path.endswith(".pt"):
        return torch.load(path, weights_only=True)
    from safetensors.torch import load_file

    return load_file(path)


def mask_delta_plain(up, down, k, scale=1.0):
    """scale * up diag(m) down with the first k ranks on (the trainers' formula)."""
    m = torch.zeros(down.shape[0])
    m[:k] = 1
    return scale * (up.double() * m.double()) @ down.double()


def mask_delta_ortho(p, lam, q, bp, blam, bq, k, scale=1.0):
    m = torch.zeros(q.shape[0], dtype=torch.float64)
    m[:k] = 1
    lam, blam = lam.reshape(-1).double() * m, blam.reshape(-1).double() * m
    return scale * ((p.double() * lam) @ q.double() - (bp.double() * blam) @ bq.double())


def close(a, b, tol=1e-5):
    return (a.double() - b.double()).norm().item() <= tol * max(b.double().norm().item(), 1e-12)


# --- LyCORIS --------------------------------------------------------------------------------------
@pytest.fixture
def lyc_file(tiny_flux, tmp_path):
    return tf.write_lycoris(tiny_flux, tmp_path / "run" / "pytorch_lora_weights.safetensors", rank=8, alpha=4,
                            min_rank=2, tlora_alpha=1.5)


def test_lycoris_simpletuner_metadata(lyc_file):
    f = formats.read_tlora(lyc_file.path)
    assert f.format.startswith("LyCORIS tlora")
    assert f.rank == 8 and set(f.modules) == set(lyc_file.modules)
    s = f.schedule
    assert (s.max_rank, s.min_rank, s.alpha, s.mode, s.truncate_timestep) == (8, 2, 1.5, "timestep", True)
    assert s.sources["min_rank"] == s.sources["alpha"] == "file metadata lycoris_config"
    assert s.sources["max_rank"] == "file tensors"
    for name, mod in f.modules.items():
        assert isinstance(mod, SvdBaseTerms)
        ly = lyc_file.modules[name]
        assert torch.equal(mod.q, ly.q_layer.weight.detach()) and torch.equal(mod.p, ly.p_layer.weight.detach())
        assert mod.alpha / mod.rank == pytest.approx(4 / 8) and mod.sig_type == "principal"
        assert name in f.lookup[name]
    assert all(isinstance(m, SvdBaseTerms) for m in f.modules.values())


def test_lycoris_completed_delta_is_lycoris_own(lyc_file):
    """SvdBaseTerms completed from W == lycoris' get_diff_weight under each timestep mask."""
    from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask

    f = formats.read_tlora(lyc_file.path)
    name = "lycoris_transformer_blocks_0_attn_to_out_0"
    ly = lyc_file.modules[name]
    mod = f.modules[name]
    adapter = mod.complete_with(mod.base_terms(ly.org_weight))  # the base weight lycoris wrapped
    try:
        for k in range(0, 9):
            m = torch.zeros(1, 8)
            m[:, :k] = 1
            set_timestep_mask(m)
            ref = ly.get_diff_weight()[0].detach()
            got = adapter.delta_weight(k)
            if k == 0:
                assert got.abs().max() == 0 and ref.abs().max() == 0
            else:  # random tiny weights: the top ranks' split may be ill-defined at fp32 -> compare loosely
                assert close(got, ref, 1e-4), k
    finally:
        clear_timestep_mask()


@pytest.mark.parametrize("where", ["sidecar", "both", "final", "none"])
def test_lycoris_settings_sources(tiny_flux, tmp_path, where):
    p = tmp_path / "w.safetensors"
    tf.write_lycoris(tiny_flux, p, rank=4, min_rank=3, tlora_alpha=2.0, settings=where,
                     only=["transformer_blocks.0.attn.to_q"])
    f = formats.read_tlora(p)
    s = f.schedule
    if where == "sidecar":
        assert (s.min_rank, s.alpha) == (3, 2.0) and s.sources["min_rank"] == "sidecar lycoris_config.json"
    elif where == "both":  # the file's own metadata wins over a sidecar
        assert (s.min_rank, s.alpha) == (3, 2.0) and s.sources["alpha"] == "file metadata lycoris_config"
    else:
        assert (s.min_rank, s.alpha) == (1, 1.0) and s.sources.get("min_rank", "default") == "default"
        assert any("defaults" in n for n in f.notes)


def test_lycoris_stale_sidecar_loses_to_metadata(tiny_flux, tmp_path):
    p = tmp_path / "w.safetensors"
    tf.write_lycoris(tiny_flux, p, rank=4, min_rank=2, tlora_alpha=1.5, only=["transformer_blocks.0.attn.to_q"])
    (tmp_path / "lycoris_config.json").write_text(json.dumps({"algo": "tlora", "tlora_min_rank": 3, "linear_dim": 4}))
    s = formats.read_tlora(p).schedule
    assert s.min_rank == 2 and s.sources["min_rank"] == "file metadata lycoris_config"


def test_lycoris_kohya_prefix_and_dtype(tiny_flux, tmp_path):
    p = tmp_path / "w.safetensors"
    lf = tf.write_lycoris(tiny_flux, p, rank=4, prefix="lora_unet", dtype=torch.bfloat16,
                          only=["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v"])
    f = formats.read_tlora(p)
    assert set(f.modules) == {"lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_single_transformer_blocks_0_attn_to_v"}
    assert "lycoris_transformer_blocks_0_attn_to_q" in f.lookup["lora_unet_transformer_blocks_0_attn_to_q"]
    assert f.modules["lora_unet_transformer_blocks_0_attn_to_q"].q.dtype == torch.float32


def test_lycoris_random_init_is_refused(tiny_flux, tmp_path):
    p = tmp_path / "w.safetensors"
    tf.write_lycoris(tiny_flux, p, rank=4, only=["transformer_blocks.0.attn.to_q"])
    sd = raw(p)
    save_file(sd, str(p), {"lycoris_config": json.dumps({"algo": "tlora", "use_data_init": False})})
    with pytest.raises(TLoRAFormatError, match="use_data_init"):
        formats.read_tlora(p)


def test_lycoris_conv_modules_are_skipped_with_a_note(tmp_path):
    import lycoris.modules.tlora as lt

    conv = torch.nn.Conv2d(8, 16, 3)
    lin = torch.nn.Linear(8, 16)
    mc = lt.TLoraModule("lycoris_down_blocks_0_resnets_0_conv1", conv, lora_dim=4, alpha=4)
    ml = lt.TLoraModule("lycoris_down_blocks_0_attentions_0_proj_in", lin, lora_dim=4, alpha=4)
    sd = {}
    for m in (mc, ml):
        for k, v in m.custom_state_dict().items():
            sd[f"{m.lora_name}.{k}"] = v.detach().clone().contiguous()
    p = tmp_path / "c.safetensors"
    save_file(sd, str(p), {"lycoris_config": json.dumps({"algo": "tlora", "tlora_min_rank": 1})})
    f = formats.read_tlora(p)
    assert list(f.modules) == ["lycoris_down_blocks_0_attentions_0_proj_in"]
    assert any("convolution" in n and "conv1" in n for n in f.notes)


def test_self_contained_copy_needs_no_svd(lyc_file, tmp_path):
    f = formats.read_tlora(lyc_file.path)
    svd = pack_module("tlora_core.svd")
    terms = {n: svd.base_terms(lyc_file.modules[n].org_weight, 8) for n in f.modules}
    dst = formats.write_self_contained(lyc_file.path, tmp_path / "copy.safetensors", terms, "test")
    g = formats.read_tlora(dst)
    assert not any(isinstance(m, SvdBaseTerms) for m in g.modules.values()) and "stored base terms" in g.format
    assert g.schedule == f.schedule  # same settings (metadata copied)
    for n, mod in f.modules.items():
        ref = mod.complete_with(terms[n])
        for k in (1, 5, 8):
            assert close(g.modules[n].delta_weight(k), ref.delta_weight(k), 1e-6)


# --- official -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["vanilla", "ortho", "lortho"])
def test_official_sdxl(tiny_sdxl, tmp_path, variant):
    p = tf.write_official_sdxl(tiny_sdxl, tmp_path / "exp", rank=4, variant=variant, min_rank=2, alpha_rank_scale=0.5)
    f = formats.read_tlora(p)
    want = "vanilla" if variant == "vanilla" else "ortho"
    assert f.format == f"official T-LoRA (SDXL, {want})"
    s = f.schedule
    assert (s.max_rank, s.min_rank, s.alpha, s.truncate_timestep) == (4, 2, 0.5, False)
    assert s.sources["min_rank"] == "sidecar ../logs/hparams.yml"
    sd = raw(p)
    name = next(n for n in f.modules if n.endswith("attn2.processor.to_k_lora"))
    for k in range(5):
        if variant == "vanilla":
            ref = mask_delta_plain(sd[name + ".up.weight"], sd[name + ".down.weight"], k)
        else:
            ref = mask_delta_ortho(*(sd[f"{name}.{t}"] for t in ("p_layer.weight", "lambda_layer", "q_layer.weight",
                                                                 "base_p.weight", "base_lambda", "base_q.weight")), k)
        got = f.modules[name].delta_weight(k)
        assert close(got, ref) if k else got.abs().max() < 1e-6
    assert f.lookup[name][0].endswith("attn2.to_k")


def test_official_vanilla_without_hparams_is_ambiguous(tiny_sdxl, tmp_path):
    p = tf.write_official_sdxl(tiny_sdxl, tmp_path / "exp", rank=4, hparams=False)
    with pytest.raises(TLoRAFormatError, match="LoraLoader"):
        formats.read_tlora(p)
    f = formats.read_tlora(p, assume_tlora=True)
    assert f.schedule.min_rank == 1 and any("hparams.yml" in n for n in f.notes)


def test_official_ortho_without_hparams_is_accepted(tiny_sdxl, tmp_path):
    p = tf.write_official_sdxl(tiny_sdxl, tmp_path / "exp", rank=4, variant="ortho", hparams=False)
    f = formats.read_tlora(p)
    assert f.format == "official T-LoRA (SDXL, ortho)" and any("hparams.yml" in n for n in f.notes)


def test_official_flux_lora_pt(tiny_flux, tmp_path, monkeypatch):
    p = tf.write_official_flux(tiny_flux, tmp_path / "exp", rank=4, min_rank=2)
    calls = []
    orig = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or orig(*a, **k))
    f = formats.read_tlora(p)
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert f.format == "official T-LoRA (Flux, vanilla)"
    s = f.schedule
    assert (s.max_rank, s.min_rank, s.alpha, s.truncate_timestep) == (4, 2, 1.0, False)
    # 1 double block x 7 projections + 1 single block x 3 used; the 4 unused single-block ones dropped
    assert len(f.modules) == 10 and any("never uses" in n for n in f.notes)
    sd = orig(str(p), weights_only=True)
    n = "transformer_blocks.0.attn.processor.to_q_proj_lora"
    assert close(f.modules[n].delta_weight(3), mask_delta_plain(sd[n + ".up.weight"], sd[n + ".down.weight"], 3))
    assert "transformer_blocks.0.attn.add_q_proj" in f.lookup[n]


def test_official_flux_plain_lora_is_refused(tiny_flux, tmp_path):
    p = tf.write_official_flux(tiny_flux, tmp_path / "exp", rank=4, tlora=False)
    with pytest.raises(TLoRAFormatError, match="tlora: false"):
        formats.read_tlora(p)


# --- seed-002 trainer -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_seed002(tiny_flux, tmp_path, variant):
    p = tf.write_seed002(tiny_flux, tmp_path / "out", rank=4, lora_alpha=8, min_rank=2, alpha_rank_scale=1.5,
                         variant=variant)
    f = formats.read_tlora(p)
    assert f.format == f"seed-002 Flux trainer ({variant})"
    s = f.schedule
    assert (s.max_rank, s.min_rank, s.alpha, s.mode) == (4, 2, 1.5, schedule_mod.STEP_INDEX)
    assert s.sources["alpha"] == "sidecar ../flux_tlora.yaml"
    sd = raw(p)
    n = "transformer_blocks.0.attn.to_v"
    for k in (1, 3, 4):
        if variant == "vanilla":
            ref = mask_delta_plain(sd[n + ".up.weight"], sd[n + ".down.weight"], k, 8 / 4)
        else:
            ref = mask_delta_ortho(*(sd[f"{n}.{t}"] for t in ("p_layer.weight", "lambda_layer", "q_layer.weight",
                                                              "base_p", "base_lambda", "base_q")), k, 8 / 4)
        assert close(f.modules[n].delta_weight(k), ref)


def test_seed002_without_rank_masking(tiny_flux, tmp_path):
    p = tf.write_seed002(tiny_flux, tmp_path / "out", rank=4, enable_rank_masking=False)
    f = formats.read_tlora(p)
    assert f.schedule.min_rank == 4 and any("enable_rank_masking" in n for n in f.notes)


def test_seed002_without_config_is_ambiguous(tiny_flux, tmp_path):
    p = tf.write_seed002(tiny_flux, tmp_path / "out", rank=4, config=False)
    with pytest.raises(TLoRAFormatError, match="YAML"):
        formats.read_tlora(p)


# --- kohya ----------------------------------------------------------------------------------------
def test_kohya_with_tlora_metadata(tiny_flux, tmp_path):
    p = tf.write_kohya(tiny_flux, tmp_path / "k.safetensors", rank=4, alpha=2, min_rank=2, alpha_rank_scale=2.0,
                       max_timestep=1000, text_encoder=True)
    f = formats.read_tlora(p)
    assert f.format == "kohya-style LoRA with T-LoRA schedule"
    s = f.schedule
    assert (s.max_rank, s.min_rank, s.alpha, s.max_timestep) == (4, 2, 2.0, 1000)
    assert s.sources["alpha"] == "file metadata ss_tlora_*"
    assert any("text-encoder" in n for n in f.notes)
    sd = raw(p)
    n = "lora_unet_double_blocks_0_img_attn_qkv"
    assert close(f.modules[n].delta_weight(3), mask_delta_plain(sd[n + ".lora_up.weight"], sd[n + ".lora_down.weight"], 3, 2 / 4))


def test_kohya_plain_lora_points_to_loraloader(tiny_flux, tmp_path):
    p = tf.write_kohya(tiny_flux, tmp_path / "k.safetensors", tlora_metadata=False)
    with pytest.raises(TLoRAFormatError, match="plain LoRA.*LoraLoader"):
        formats.read_tlora(p)
    # the same file with the settings in a sidecar is a T-LoRA
    (tmp_path / "k.json").write_text(json.dumps({"ss_tlora_min_rank": 2, "ss_tlora_alpha_rank_scale": 0.5}))
    f = formats.read_tlora(p)
    assert f.schedule.alpha == 0.5 and f.schedule.sources["alpha"] == "sidecar k.json"


# --- bad input --------------------------------------------------------------------------------------
def _small_lycoris(tmp_path, **overrides):
    sd = {"lycoris_a.q_layer.weight": torch.randn(4, 8), "lycoris_a.p_layer.weight": torch.randn(6, 4),
          "lycoris_a.lambda_layer": torch.ones(1, 4), "lycoris_a.alpha": torch.tensor(4.0)}
    sd.update(overrides)
    p = tmp_path / "s.safetensors"
    save_file(sd, str(p))
    return p


def test_error_names_file_and_problem_nan(tmp_path):
    bad = torch.randn(6, 4)
    bad[2, 1] = float("nan")
    p = _small_lycoris(tmp_path, **{"lycoris_a.p_layer.weight": bad})
    with pytest.raises(TLoRAFormatError) as e:
        formats.read_tlora(p)
    assert "s.safetensors" in str(e.value) and "NaN" in str(e.value) and "lycoris_a.p_layer.weight" in str(e.value)


def test_rank_mismatch(tmp_path):
    p = _small_lycoris(tmp_path, **{"lycoris_a.lambda_layer": torch.ones(1, 3)})
    with pytest.raises(TLoRAFormatError, match="rank mismatch"):
        formats.read_tlora(p)


def test_truncated_safetensors(tmp_path):
    p = _small_lycoris(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 40])
    with pytest.raises(TLoRAFormatError, match="truncated or corrupt"):
        formats.read_tlora(p)


def test_truncated_torch_file(tiny_flux, tmp_path):
    p = tf.write_official_flux(tiny_flux, tmp_path / "exp", rank=2)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(TLoRAFormatError, match="truncated or corrupt"):
        formats.read_tlora(p)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_unsafe_pickle_is_refused_and_not_run(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    p = tmp_path / "lora.pt"
    torch.save({"transformer_blocks.0.attn.processor.to_q_lora.down.weight": torch.zeros(2, 4), "x": _Evil()}, str(p))
    with pytest.raises(TLoRAFormatError, match="refused"):
        formats.read_tlora(p)
    assert not Path(_Evil.marker).exists()


def test_not_a_tlora(tmp_path):
    p = tmp_path / "peft.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 4), "transformer.x.lora_B.weight": torch.zeros(4, 2)}, str(p))
    with pytest.raises(TLoRAFormatError, match="PEFT.*LoraLoader"):
        formats.read_tlora(p)
    p2 = tmp_path / "locon.safetensors"
    save_file({"lycoris_x.lora_down.weight": torch.zeros(2, 4), "lycoris_x.lora_up.weight": torch.zeros(4, 2)}, str(p2))
    with pytest.raises(TLoRAFormatError, match="LyCORIS lora/locon"):
        formats.read_tlora(p2)
    p3 = tmp_path / "other.safetensors"
    save_file({"foo.bar": torch.zeros(2)}, str(p3))
    with pytest.raises(TLoRAFormatError, match="not a T-LoRA"):
        formats.read_tlora(p3)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TLoRAFormatError, match="no such file"):
        formats.read_tlora(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(TLoRAFormatError, match="empty"):
        formats.read_tlora(tmp_path / "empty.safetensors")


def test_formats_and_svd_import_without_comfyui():
    import subprocess
    import sys

    from devkit.host import ROOT

    code = ("import sys; sys.path.insert(0, %r); import tlora_core.formats, tlora_core.svd;"
            "assert not any(m == 'comfy' or m.startswith(('comfy.', 'comfy_')) for m in sys.modules)" % str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unrelated_sidecar_is_not_taken_for_settings(tiny_flux, tmp_path):
    p = tmp_path / "w.safetensors"
    tf.write_lycoris(tiny_flux, p, rank=4, settings="none", only=["transformer_blocks.0.attn.to_q"])
    (tmp_path / "w.json").write_text(json.dumps({"modelId": 123, "trainedWords": ["sks"]}))  # e.g. a model-site card
    f = formats.read_tlora(p)
    assert f.schedule.sources.get("min_rank", "default") == "default"
    assert any("no training settings found" in n for n in f.notes)


# --- the trainers of 2026: Anima kohya fork, takenoko, Fizgig; LyCORIS' rank-2r export ------------
# Files written as each trainer's save code writes them (devkit.tlora_files) on small stand-ins with
# the module classes and names of the host models the trainers walk (no ComfyUI needed).
class _Mod(torch.nn.Module):
    def __init__(self, **children):
        super().__init__()
        for n, c in children.items():
            self.add_module(n, c)


def _lin(i, o):
    return torch.nn.Linear(i, o, bias=False)


class Block(torch.nn.Module):
    """Cosmos-Predict2 / Anima ``Block`` (the names of ComfyUI's MiniTrainDIT)."""

    def __init__(self, d=32, ctx=16):
        super().__init__()
        attn = lambda kv: _Mod(q_proj=_lin(d, d), k_proj=_lin(kv, d), v_proj=_lin(kv, d), output_proj=_lin(d, d))
        self.self_attn, self.cross_attn = attn(d), attn(ctx)
        self.mlp = _Mod(layer1=_lin(d, 4 * d), layer2=_lin(4 * d, d))
        for n in ("adaln_modulation_self_attn", "adaln_modulation_cross_attn", "adaln_modulation_mlp"):
            self.add_module(n, torch.nn.Sequential(torch.nn.SiLU(), _lin(d, 8), _lin(8, 3 * d)))


class PatchEmbed(_Mod):
    pass


class TimestepEmbedding(_Mod):
    pass


class FinalLayer(_Mod):
    pass


class WanAttentionBlock(torch.nn.Module):
    def __init__(self, d=32, ffn=64):
        super().__init__()
        attn = lambda: _Mod(q=_lin(d, d), k=_lin(d, d), v=_lin(d, d), o=_lin(d, d))
        self.self_attn, self.cross_attn = attn(), attn()
        self.ffn = torch.nn.Sequential(_lin(d, ffn), torch.nn.GELU(), _lin(ffn, d))


def _anima_dit(d=32):
    torch.manual_seed(0)
    return _Mod(x_embedder=PatchEmbed(proj=torch.nn.Sequential(torch.nn.Identity(), _lin(64, d))),
                t_embedder=torch.nn.Sequential(torch.nn.Identity(), TimestepEmbedding(linear_1=_lin(d, d), linear_2=_lin(d, d))),
                blocks=torch.nn.ModuleList([Block(d), Block(d)]),
                final_layer=FinalLayer(linear=_lin(d, 64), adaln_modulation=torch.nn.Sequential(torch.nn.SiLU(), _lin(d, 2 * d))))


def _wan_dit(d=32):
    torch.manual_seed(0)
    return _Mod(text_embedding=torch.nn.Sequential(_lin(16, d), torch.nn.GELU(), _lin(d, d)),
                blocks=torch.nn.ModuleList([WanAttentionBlock(d), WanAttentionBlock(d)]), head=_Mod(head=_lin(d, 64)))


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _groups(path):
    out = {}
    for k, v in raw(path).items():
        name, _, suffix = k.partition(".")
        out.setdefault(name, {})[suffix] = v
    return out


def _check_deltas(f, groups, prefix_len=0):
    """The reader's adapters against the trainer's forward from the raw tensors, at every rank."""
    for name, t in groups.items():
        ad = f.modules[name]
        alpha = float(t["alpha"])
        for k in range(1, ad.rank + 1):
            if "q_layer.weight" in t:
                base_lam = t.get("base_lambda_buf", t.get("base_lambda"))
                ref = mask_delta_ortho(t["p_layer.weight"], t["lambda_layer"], t["q_layer.weight"], t["base_p.weight"],
                                       base_lam, t["base_q.weight"], k, alpha / ad.rank)
            else:
                ref = mask_delta_plain(t["lora_up.weight"], t["lora_down.weight"], k, alpha / ad.rank)
            assert close(ad.delta_weight(k), ref), (name, k)


ANIMA_MODULES = {f"lora_unet_blocks_{b}_{m}" for b in range(2) for m in
                 ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_output_proj", "cross_attn_q_proj",
                  "cross_attn_k_proj", "cross_attn_v_proj", "cross_attn_output_proj", "mlp_layer1", "mlp_layer2"]}


@pytest.mark.parametrize("init", ["kaiming", "orthogonal", "layer_orthogonal"])
def test_anima_fork_file(tmp_path, init):
    p = tf.write_anima(_anima_dit(), tmp_path / "anima.safetensors", init=init, rank=4, alpha=2.0, min_rank=1,
                       alpha_rank_scale=2.0, sig_type="last")
    groups = _groups(p)
    assert set(groups) == ANIMA_MODULES  # 10 per block; modulation, embedders, final layer excluded
    suffixes = ({"lora_down.weight", "lora_up.weight", "alpha"} if init == "kaiming" else
                {"q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda_buf",
                 "alpha"})
    assert all(set(t) == suffixes for t in groups.values())
    assert {v.dtype for t in groups.values() for v in t.values()} == {torch.bfloat16}  # alpha and lambdas too
    meta = _meta(p)
    assert {k: meta[k] for k in meta if k.startswith("ss_tlora_")} == {
        "ss_tlora_min_rank": "1", "ss_tlora_alpha_rank_scale": "2.0", "ss_tlora_max_timestep": "1.0",
        "ss_tlora_init": init, "ss_tlora_sig_type": "last"}
    f = formats.read_tlora(p)
    s = f.schedule
    assert type(s.max_timestep) is float and s.max_timestep == 1.0  # "1.0": the DiT's t = sigma in [0, 1]
    assert (s.max_rank, s.min_rank, s.alpha, s.truncate_timestep, s.mode) == (4, 1, 2.0, False, "timestep")
    assert s.sources["max_timestep"] == "file metadata ss_tlora_*"
    assert f.format.startswith("T-LoRA kohya fork (orangemagic123/sd-scripts) for Anima") and f.format.endswith(f"({init})")
    assert any("'all ranks'" in n for n in f.notes)
    _check_deltas(f, groups)
    if init == "layer_orthogonal":  # the stored base is the layer's SVD ("last" window), used as stored
        w = _anima_dit().blocks[0].mlp.layer1.weight.detach()
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        t = groups["lora_unet_blocks_0_mlp_layer1"]
        assert close(t["base_lambda_buf"].reshape(-1), sv[-4:], 1e-2)


def test_anima_fork_max_timestep_is_a_float(tmp_path):
    p = tf.write_anima(_anima_dit(), tmp_path / "a.safetensors", rank=4, max_timestep=0.5, comfy_sibling=False)
    assert _meta(p)["ss_tlora_max_timestep"] == "0.5"
    assert formats.read_tlora(p).schedule.max_timestep == 0.5


@pytest.mark.parametrize("init", ["kaiming", "orthogonal"])
def test_anima_comfy_sibling(tmp_path, init):
    p = tf.write_anima(_anima_dit(), tmp_path / "anima.safetensors", init=init, rank=4, alpha=2.0)
    sib = tf.anima_comfy_sibling_path(p)
    assert sib.name == "anima_comfy.safetensors"
    sd, meta = raw(sib), _meta(sib)
    assert not any(k.startswith("ss_tlora_") for k in meta)
    assert meta["ss_network_module"] == "networks.lora_tlora_anima" and "tlora_init" in meta["ss_network_args"]
    key = "diffusion_model.blocks.0.self_attn.q_proj"
    assert {k for k in sd if k.startswith(key + ".")} == {key + ".lora_A.weight", key + ".lora_B.weight", key + ".alpha"}
    rank = 8 if init == "orthogonal" else 4
    assert sd[key + ".lora_A.weight"].shape[0] == rank
    assert sd[key + ".alpha"].dtype == (torch.float32 if init == "orthogonal" else torch.bfloat16)
    full = formats.read_tlora(p).modules["lora_unet_blocks_0_self_attn_q_proj"].delta_weight()
    plain = float(sd[key + ".alpha"]) / rank * sd[key + ".lora_B.weight"].double() @ sd[key + ".lora_A.weight"].double()
    assert close(plain, full, 2e-2)  # the full-rank delta (bf16 products)
    with pytest.raises(TLoRAFormatError, match=r"_comfy export.*LoraLoader"):
        formats.read_tlora(sib)


@pytest.mark.parametrize("case", ["lora", "ortho_lora", "ortho_from_layer"])
def test_takenoko_file(tmp_path, case):
    kw = dict(trainer_type="ortho_lora" if case != "lora" else "lora", ortho_from_layer=case == "ortho_from_layer")
    p = tf.write_takenoko(_wan_dit(), tmp_path / "t.safetensors", rank=4, alpha=2.0, min_rank=2, tlora_alpha=1.5,
                          boundary=800, **kw)
    groups = _groups(p)
    assert all(n.startswith("t_lora_unet_blocks_") for n in groups) and len(groups) == 20
    assert {v.dtype for t in groups.values() for v in t.values()} == {torch.bfloat16}
    ortho = {n for n, t in groups.items() if "q_layer.weight" in t}
    if case == "lora":
        assert not ortho
    elif case == "ortho_lora":  # random init: the non-square ffn layers fail its copy_ and stay plain
        assert {n for n in groups if n not in ortho} == {f"t_lora_unet_blocks_{b}_ffn_{i}" for b in (0, 1) for i in (0, 2)}
    else:
        assert ortho == set(groups)
    for n in ortho:  # the unused lora_down / lora_up are saved too, lora_up still zero
        assert set(groups[n]) == {"lora_down.weight", "lora_up.weight", "alpha", "q_layer.weight", "p_layer.weight",
                                  "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda"}
        assert not groups[n]["lora_up.weight"].any()
    meta = _meta(p)
    assert meta["takenoko_network_module"] == "networks.t_lora" and not any(k.startswith("ss_") for k in meta)
    config = meta["takenoko_config_content"]
    assert "network_args = [" in config and '"tlora_boundary_timestep=800",' in config
    f = formats.read_tlora(p)
    s = f.schedule
    assert (s.max_rank, s.min_rank, s.alpha, s.boundary_timestep, s.max_timestep) == (4, 2, 1.5, 800, 1000)
    assert (s.timestep_offset, s.truncate_timestep) == (1.0, False)
    assert s.sources["boundary_timestep"] == "file metadata takenoko_config_content (network_args)"
    assert f.lookup["t_lora_unet_blocks_0_self_attn_q"][0] == "lora_unet_blocks_0_self_attn_q"
    _check_deltas(f, groups)


def test_takenoko_file_without_config(tmp_path):
    p = tf.write_takenoko(_wan_dit(), tmp_path / "t.safetensors", rank=4, min_rank=3, boundary=700, embed_config=False)
    assert "takenoko_config_content" not in _meta(p)
    f = formats.read_tlora(p)
    assert (f.schedule.min_rank, f.schedule.alpha, f.schedule.boundary_timestep) == (1, 1.0, 875)
    assert f.schedule.sources["min_rank"] == "takenoko defaults"
    assert any("no takenoko config" in n for n in f.notes)


@pytest.mark.parametrize("min_rank, expected", [(2, 2), (0, 1), (9, 4)])
def test_fizgig_file(tmp_path, min_rank, expected):
    dit = _Mod(first=_lin(16, 32), blocks=torch.nn.ModuleList([_Mod(attn=_Mod(wq=_lin(32, 32), wo=_lin(32, 32)))]),
               txtfusion=_Mod(projector=_lin(3, 1)))
    p = tf.write_fizgig(dit, tmp_path / "fz.safetensors", min_rank=min_rank, rank=4, alpha=4.0)
    groups = _groups(p)
    assert set(groups) == {"lora_unet_first", "lora_unet_blocks_0_attn_wq", "lora_unet_blocks_0_attn_wo",
                           "lora_unet_txtfusion_projector"}  # every Linear ("all-Linear")
    assert {v.dtype for t in groups.values() for v in t.values()} == {torch.bfloat16}
    meta = _meta(p)
    assert (meta["ss_adapter"], meta["ss_architecture"], meta["ss_tlora_max_timestep"]) == ("tlora", "krea2", "1000")
    assert meta["ss_tlora_min_rank"] == str(min_rank) and "timestep rank mask" in meta["ss_adapter_weights"]
    f = formats.read_tlora(p)
    s = f.schedule
    assert f.format == "Fizgig T-LoRA (krea2)"
    # Fizgig's TLoRAModule clamps min_rank to [1, R]; its rule is linear on int(1000 t) out of 1000
    assert (s.min_rank, s.alpha, s.max_timestep, s.truncate_timestep) == (expected, 1.0, 1000, True)
    _check_deltas(f, groups)


@pytest.mark.parametrize("metadata", ["sd-scripts", "simpletuner", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lycoris_rank2r_export_is_a_plain_lora(tmp_path, metadata, dtype):
    dit = _wan_dit()
    mods = ["blocks.0.self_attn.q", "blocks.0.ffn.0"]
    prefix = "lycoris" if metadata == "simpletuner" else "lora_unet"
    p = tf.write_lycoris_rank2r_export(dit, tmp_path / "x.safetensors", rank=4, alpha=2.0, metadata=metadata,
                                       modules=mods, dtype=dtype, prefix=prefix)
    sd = raw(p)
    name = prefix + "_blocks_0_self_attn_q"
    assert sd[name + ".lora_down.weight"].shape == (8, 32) and float(sd[name + ".alpha"]) == 4.0
    down = sd[name + ".lora_down.weight"].double()[4:]  # Q_base: the layer's principal right singular vectors
    vh = torch.linalg.svd(dit.blocks[0].self_attn.q.weight.detach().double(), full_matrices=False)[2][:4]
    assert close(down.abs(), vh.abs(), 1e-2)
    exported = r"(this is|this looks like) a T-LoRA exported as a plain LoRA.*rank-2r.*LoraLoader"
    with pytest.raises(TLoRAFormatError, match=exported):
        formats.read_tlora(p)
