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
