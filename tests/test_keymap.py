"""comfy_glue.binding.bind_tlora on tiny ComfyUI models (Flux- and SDXL-like) with real files.

References are independent of the code under test: lycoris-lora's own TLoraModule (its fp32 SVD base
buffers and get_diff_weight under set_timestep_mask) on a diffusers-named copy of the model, the
placement ComfyUI's diffusers maps give (comfy.utils.flux_to_diffusers / unet_to_diffusers, via
devkit), and the raw tensors of the files.
"""

from __future__ import annotations

import logging

import pytest
import torch

from devkit import tlora_files as tf
from devkit.host import pack_module

TOL = 1e-5
base_cache = pack_module("comfy_glue.base_cache")


@pytest.fixture(scope="module")
def mods(comfy):
    return {
        "keymap": pack_module("comfy_glue.binding"),
        "formats": pack_module("tlora_core.formats"),
        "svd": pack_module("tlora_core.svd"),
    }


def prefix(p, lam, q, k):
    return (p[:, :k].double() * lam.reshape(-1)[:k].double()) @ q[:k].double()


def rel(a, b):
    return (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-30)


def lycoris_delta(module, k, R):
    from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask

    m = torch.zeros(1, R)
    m[:, :k] = 1
    set_timestep_mask(m)
    try:
        return module.get_diff_weight()[0].detach()
    finally:
        clear_timestep_mask()


def separated(model_patcher):
    """Every diffusers-named linear of the model gets a trained-like (separated) spectrum."""
    tf.separate_spectrum_(model_patcher, list(tf.diffusers_targets(model_patcher)), decay=0.85)
    return model_patcher


def bind(mods, model, path, tmp_path, **kw):
    f = mods["formats"].read_tlora(path)
    return f, mods["keymap"].bind_tlora(model, f, cache_dir=kw.pop("cache_dir", tmp_path / "cache"),
                                        progress=False, **kw)


def check_exact(b, lf, R):
    """Base terms == lycoris' own at every prefix; delta == lycoris' own masked delta."""
    by_name = {t.adapter.name: t for t in b.targets}
    for name, ly in lf.modules.items():
        t = by_name[name]
        terms = b.base_terms[name]
        for k in range(1, R + 1):
            assert rel(prefix(terms.p, terms.lam, terms.q, k), prefix(ly.base_p, ly.base_lambda, ly.base_q, k)) <= TOL, (name, k)
        for k in (0, 1, R // 2, R):
            ref = lycoris_delta(ly, k, R)
            got = t.adapter.delta_weight(k)
            if k == 0:
                assert got.abs().max() == 0
            else:
                assert rel(got, ref) <= TOL, (name, k)


def test_lycoris_flux_exact_including_fused_slices(mods, tmp_path):
    from devkit.tiny_models import tiny_flux

    m = separated(tiny_flux(seed=0))
    lf = tf.write_lycoris(m, tmp_path / "f.safetensors", rank=8, alpha=4)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    f, b = bind(mods, m, lf.path, tmp_path)
    assert sorted(b.matched) == sorted(lf.modules) and b.unmatched == []
    assert not any("nearly coincide" in n for n in b.notes)
    # placed where ComfyUI's diffusers map puts each diffusers module (fused qkv / linear1 slices)
    for t in b.targets:
        key, piece = lf.targets[t.adapter.name]
        assert t.module == key[len("diffusion_model."):-len(".weight")]
        assert t.out_slice == ((piece[1], piece[2]) if piece else None)
    assert sum(t.out_slice is not None for t in b.targets) == 9  # img q,k,v + txt q,k,v + single q,k,v
    check_exact(b, lf, 8)
    # nothing on the model was modified
    after = m.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not m.patches


def test_lycoris_sdxl_exact(mods, tmp_path):
    from devkit.tiny_models import tiny_sdxl

    m = separated(tiny_sdxl(seed=0))
    lf = tf.write_lycoris(m, tmp_path / "s.safetensors", rank=6)
    f, b = bind(mods, m, lf.path, tmp_path)
    assert sorted(b.matched) == sorted(lf.modules) and len(lf.modules) >= 10
    assert any(t.adapter.in_features == 64 for t in b.targets)  # cross-attention to_k/to_v (context dim)
    check_exact(b, lf, 6)


def test_random_weights_match_or_are_flagged(mods, tiny_flux, tmp_path):
    lf = tf.write_lycoris(tiny_flux, tmp_path / "r.safetensors", rank=8,
                          only=["transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"])
    f, b = bind(mods, tiny_flux, lf.path, tmp_path)
    for name, ly in lf.modules.items():
        terms = b.base_terms[name]
        for k in range(1, 9):
            err = rel(prefix(terms.p, terms.lam, terms.q, k), prefix(ly.base_p, ly.base_lambda, ly.base_q, k))
            assert err <= TOL or k in terms.ill_conditioned, (name, k, err)
    if any(t.ill_conditioned for t in b.base_terms.values()):
        assert any("nearly coincide" in n for n in b.notes)


def test_cache_reload_needs_no_svd_and_follows_the_weights(mods, tiny_flux, tmp_path, monkeypatch):
    lf = tf.write_lycoris(tiny_flux, tmp_path / "c.safetensors", rank=4,
                          only=["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2"])
    f, b1 = bind(mods, tiny_flux, lf.path, tmp_path)
    calls = []
    real = mods["svd"].base_terms

    def counting(w, *a, **k):
        calls.append(tuple(w.shape))
        return real(w, *a, **k)

    monkeypatch.setattr(mods["svd"], "base_terms", counting)
    f, b2 = bind(mods, tiny_flux, lf.path, tmp_path)
    assert calls == [] and any("from the cache" in n for n in b2.notes)
    for t1, t2 in zip(b1.targets, b2.targets):
        assert torch.equal(t1.adapter.up, t2.adapter.up) and torch.equal(t1.adapter.down, t2.adapter.down)
    # another base weight (a fine-tune, a merge...) is a cache miss for that layer only
    with torch.no_grad():
        tiny_flux.model.diffusion_model.double_blocks[0].img_mlp[2].weight.mul_(1.01)
    f, b3 = bind(mods, tiny_flux, lf.path, tmp_path)
    assert calls == [(256, 1024)]
    # no cache at all
    f, b4 = bind(mods, tiny_flux, lf.path, tmp_path, cache_dir=False)
    assert len(calls) == 3


@pytest.mark.parametrize("hasher", ["xxh3", "sha1 without xxhash"])
def test_cache_key_is_the_exact_weight(mods, monkeypatch, hasher):
    """The cache key follows the bytes, shape and dtype the SVD sees, with xxhash (a requirement)
    and with the sha1 fallback of an install that skipped requirements.txt."""
    keymap = mods["keymap"]
    if hasher != "xxh3":
        monkeypatch.setattr(base_cache, "xxhash", None)
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    key = base_cache.fingerprint(w)
    assert len(key) >= 32 and base_cache.fingerprint(w.clone()) == key
    nudged = w.clone()
    nudged[17, 5] = torch.nextafter(nudged[17, 5], torch.tensor(float("inf")))  # one ulp in one element
    assert base_cache.fingerprint(nudged) != key
    assert base_cache.fingerprint(w.reshape(48, 64)) != key  # same bytes, another shape
    assert base_cache.fingerprint(w.view(torch.int32)) != key  # same bytes, another dtype
    assert base_cache.fingerprint(w.t()) == base_cache.fingerprint(w.t().contiguous()) != key
    with_xxhash = hasher == "xxh3"
    assert (len(key) == 32) == with_xxhash and (len(key) == 40) == (not with_xxhash)


def test_zero_matches_is_a_clear_error(mods, tiny_flux, tmp_path):
    from devkit.tiny_models import tiny_sdxl

    lf = tf.write_lycoris(tiny_sdxl(seed=0), tmp_path / "sdxl.safetensors", rank=4)
    with pytest.raises(mods["formats"].TLoRAFormatError) as e:
        bind(mods, tiny_flux, lf.path, tmp_path)
    msg = str(e.value)
    assert "sdxl.safetensors" in msg and "nothing matches" in msg and "Flux" in msg and "LyCORIS" in msg
    assert "lycoris_down_blocks" in msg or "lycoris_mid_block" in msg or "lycoris_up_blocks" in msg


def test_partial_match_is_an_error_unless_asked_for(mods, tiny_flux, tmp_path, caplog):
    from devkit.tiny_models import tiny_flux as make

    lf = tf.write_lycoris(make(seed=0, depth=2), tmp_path / "d2.safetensors", rank=4,
                          only=["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q",
                                "transformer_blocks.1.attn.to_k"])
    with pytest.raises(mods["formats"].TLoRAFormatError) as e:
        bind(mods, tiny_flux, lf.path, tmp_path)
    msg = str(e.value)
    assert "d2.safetensors" in msg and "only 1 of the file's 3" in msg and "Flux" in msg and "allow_partial" in msg
    assert "lycoris_transformer_blocks_1_attn_to_k" in msg
    with caplog.at_level(logging.WARNING, logger="comfyui_tlora"):
        f, b = bind(mods, tiny_flux, lf.path, tmp_path, allow_partial=True)
    assert b.matched == ["lycoris_transformer_blocks_0_attn_to_q"]
    assert sorted(b.unmatched) == ["lycoris_transformer_blocks_1_attn_to_k", "lycoris_transformer_blocks_1_attn_to_q"]
    assert any("1 of 3 modules" in n for n in b.notes)
    assert "1 of 3 modules" in caplog.text


def test_shape_mismatch_is_a_clear_error(mods, tiny_flux, tmp_path):
    from devkit.tiny_models import tiny_flux as make

    lf = tf.write_lycoris(make(seed=0, hidden_size=128, num_heads=1), tmp_path / "h128.safetensors", rank=4,
                          only=["transformer_blocks.0.attn.to_q"])
    with pytest.raises(mods["formats"].TLoRAFormatError, match="shape mismatch.*128x128 in the file, 256x256"):
        bind(mods, tiny_flux, lf.path, tmp_path)


def test_fp8_base_weight_is_dequantized_with_a_note(mods, tiny_flux, tmp_path):
    lf = tf.write_lycoris(tiny_flux, tmp_path / "q.safetensors", rank=4, only=["transformer_blocks.0.attn.to_out.0"])
    layer = tiny_flux.model.diffusion_model.double_blocks[0].img_attn.proj
    w8 = layer.weight.detach().to(torch.float8_e4m3fn)
    layer.weight = torch.nn.Parameter(w8, requires_grad=False)
    f, b = bind(mods, tiny_flux, lf.path, tmp_path)
    assert any("float8_e4m3fn" in n and "dequantized" in n for n in b.notes)
    terms = b.base_terms["lycoris_transformer_blocks_0_attn_to_out_0"]
    u, s, vh = torch.linalg.svd(w8.double(), full_matrices=False)
    assert rel(prefix(terms.p, terms.lam, terms.q, 4), (u[:, :4] * s[:4]) @ vh[:4]) < 1e-6
    # approximate base terms must not be frozen into a self-contained copy
    assert b.quantized == ["float8_e4m3fn"]
    with pytest.raises(ValueError, match=r"q\.safetensors: the base weights are float8_e4m3fn"):
        mods["keymap"].save_self_contained(b, str(tmp_path / "q_copy.safetensors"))
    assert not (tmp_path / "q_copy.safetensors").exists()


def test_function_target_swapped_halves(mods, tiny_flux, tmp_path):
    """diffusers ``norm_out.linear`` is ComfyUI's ``final_layer.adaLN_modulation.1`` with its two
    output halves swapped (a function target in ComfyUI's key map)."""
    import json

    import comfy.utils
    from lycoris import create_lycoris
    from lycoris.modules.tlora import TLoraModule

    from devkit.tlora_files import Container

    comfy_w = tiny_flux.model.diffusion_model.final_layer.adaLN_modulation[1].weight.detach()
    root = Container()
    root.add_module("norm_out", Container())
    lin = torch.nn.Linear(comfy_w.shape[1], comfy_w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(comfy.utils.swap_scale_shift(comfy_w))
    root.norm_out.add_module("linear", lin)
    with tf._lycoris_env() as LN:
        LN.apply_preset({"target_module": ["Linear"], "lora_prefix": "lycoris"})
        net = create_lycoris(root, 1.0, 4, 4, algo="tlora")
        net.apply_to()
    ly = next(m for m in net.loras if isinstance(m, TLoraModule))
    tf.train_([ly], seed=1)
    p = tmp_path / "fn.safetensors"
    net.save_weights(str(p), torch.float32, {"lycoris_config": json.dumps({"algo": "tlora", "tlora_min_rank": 1})})
    f, b = bind(mods, tiny_flux, p, tmp_path)
    (t,) = b.targets
    assert t.module == "final_layer.adaLN_modulation.1" and t.out_slice is None
    for k in (1, 4):  # ComfyUI applies fn to the file's delta: the model's delta is swapped back
        ref = comfy.utils.swap_scale_shift(lycoris_delta(ly, k, 4))
        assert rel(t.adapter.delta_weight(k), ref) < 1e-4


def test_native_comfyui_names(mods, tmp_path):
    from devkit.tiny_models import tiny_flux

    m = separated(tiny_flux(seed=0))
    paths = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"]
    lf = tf.write_lycoris_native(m, tmp_path / "n.safetensors", paths, rank=4)
    f, b = bind(mods, m, lf.path, tmp_path)
    assert sorted((t.module, t.out_slice) for t in b.targets) == [(p, None) for p in sorted(paths)]
    by_name = {t.adapter.name: t for t in b.targets}
    for name, ly in lf.modules.items():
        for k in (1, 4):
            assert rel(by_name[name].adapter.delta_weight(k), lycoris_delta(ly, k, 4)) <= 1e-4


def test_official_flux_placement(mods, tiny_flux, tmp_path):
    p = tf.write_official_flux(tiny_flux, tmp_path / "exp", rank=4)
    f, b = bind(mods, tiny_flux, p, tmp_path)
    assert b.unmatched == [] and len(b.targets) == 10
    where = {t.adapter.name: (t.module, t.out_slice) for t in b.targets}
    assert where["transformer_blocks.0.attn.processor.to_q_proj_lora"] == ("double_blocks.0.txt_attn.qkv", (0, 256))
    assert where["transformer_blocks.0.attn.processor.to_v_lora"] == ("double_blocks.0.img_attn.qkv", (512, 256))
    assert where["transformer_blocks.0.attn.processor.to_out_lora"] == ("double_blocks.0.img_attn.proj", None)
    assert where["single_transformer_blocks.0.attn.processor.to_k_lora"] == ("single_blocks.0.linear1", (256, 256))
    for t in b.targets:  # complete adapters pass through unchanged
        assert t.adapter is f.modules[t.adapter.name]


def test_official_sdxl_and_kohya_and_seed002_placement(mods, tiny_flux, tiny_sdxl, tmp_path):
    p = tf.write_official_sdxl(tiny_sdxl, tmp_path / "sdxl", rank=4)
    f, b = bind(mods, tiny_sdxl, p, tmp_path)
    assert b.unmatched == [] and len(b.targets) == len(f.modules) >= 8
    assert all(".attn" in t.module or "to_" in t.module for t in b.targets)
    p = tf.write_kohya(tiny_flux, tmp_path / "k.safetensors", rank=4,
                       modules=["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"])
    f, b = bind(mods, tiny_flux, p, tmp_path)
    assert sorted((t.module, t.out_slice) for t in b.targets) == [("double_blocks.0.img_attn.qkv", None),
                                                                  ("single_blocks.0.linear1", None)]
    # PEFT-style names ("transformer." prefix, no processor) through the fallback
    p = tf.write_seed002(tiny_flux, tmp_path / "s2", rank=4, prefix="transformer.")
    f, b = bind(mods, tiny_flux, p, tmp_path)
    assert b.unmatched == [] and len(b.targets) == 11
    assert ("double_blocks.0.txt_attn.proj", None) in {(t.module, t.out_slice) for t in b.targets}


def test_self_contained_copy_binds_without_svd(mods, tiny_flux, tmp_path, monkeypatch):
    lf = tf.write_lycoris(tiny_flux, tmp_path / "o.safetensors", rank=4,
                          only=["transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_q"])
    f, b = bind(mods, tiny_flux, lf.path, tmp_path)
    dst = mods["keymap"].save_self_contained(b, str(tmp_path / "copy" / "o_base.safetensors"))

    def no_svd(*a, **k):
        raise AssertionError("SVD called for a self-contained file")

    monkeypatch.setattr(mods["svd"], "base_terms", no_svd)
    g, b2 = bind(mods, tiny_flux, dst, tmp_path, cache_dir=False)
    assert "stored base terms" in g.format
    d1 = {t.adapter.name: t for t in b.targets}
    for t in b2.targets:
        for k in (1, 4):
            assert rel(t.adapter.delta_weight(k), d1[t.adapter.name].adapter.delta_weight(k)) < 1e-6


def test_inference_mode_weights_bind_and_a_changed_weight_is_rehashed(mods, tmp_path):
    """ComfyUI's server loads weights under inference mode: such tensors have no version counter,
    so binding must work on them and must notice an in-place change (no stale cached base terms)."""
    from devkit.tiny_models import tiny_flux

    m = separated(tiny_flux(seed=0))
    lf = tf.write_lycoris(m, tmp_path / "f.safetensors", rank=8, alpha=4)
    dm = m.model.diffusion_model
    with torch.inference_mode():
        for name, p in list(dm.named_parameters()):
            owner, attr = name.rsplit(".", 1)
            setattr(dm.get_submodule(owner), attr, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    first = next(p for p in dm.parameters())
    assert first.is_inference()
    _, b = bind(mods, m, lf.path, tmp_path)
    check_exact(b, lf, 8)

    name = next(iter(lf.modules))
    key, piece = lf.targets[name]
    weight = dict(dm.named_parameters())[key[len("diffusion_model."):]]
    with torch.inference_mode():
        weight.mul_(2.0)  # the base weight changes in place: its singular values double
    _, b2 = bind(mods, m, lf.path, tmp_path)
    lam1, lam2 = b.base_terms[name].lam.reshape(-1).double(), b2.base_terms[name].lam.reshape(-1).double()
    assert torch.allclose(lam2, 2 * lam1, rtol=1e-5)


def test_a_file_for_a_family_comfyui_does_not_run_says_so(mods, tiny_sdxl, tmp_path):
    """SimpleTuner's checkpoints name the family they were trained for (modelspec.architecture):
    a Sana T-LoRA (ComfyUI runs no Sana model) is refused saying so, not only "nothing matches"."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from devkit.tiny_models import tiny_flux

    lf = tf.write_lycoris(tiny_flux(seed=0), tmp_path / "src.safetensors", rank=4, only=["transformer_blocks.0.attn.to_q"])
    with safe_open(str(lf.path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for arch, want in (("sana-1600m/lora", "Sana, a model ComfyUI does not run"), ("flux-dev/lora", "trained for Flux.1")):
        path = tmp_path / f"{arch.split('-')[0]}.safetensors"
        save_file(tensors, str(path), dict(meta, **{"modelspec.architecture": arch}))
        with pytest.raises(mods["formats"].TLoRAFormatError, match="nothing matches") as e:
            bind(mods, tiny_sdxl, path, tmp_path)
        assert want in str(e.value)


def test_quantized_tensor_base_weight_is_dequantized_and_named(mods, tiny_flux, tmp_path):
    """ComfyUI's quantized weights (its own QuantizedTensor before 0.28, comfy-kitchen's after):
    the SVD reads the dequantized values, and the note names the layout on every host."""
    quant_ops = pytest.importorskip("comfy.quant_ops")
    lf = tf.write_lycoris(tiny_flux, tmp_path / "qt.safetensors", rank=4, only=["transformer_blocks.0.attn.to_out.0"])
    layer = tiny_flux.model.diffusion_model.double_blocks[0].img_attn.proj
    qt = quant_ops.QuantizedTensor.from_float(layer.weight.detach().float(), "TensorCoreFP8Layout")
    layer.weight = torch.nn.Parameter(qt, requires_grad=False)
    f, b = bind(mods, tiny_flux, lf.path, tmp_path)
    assert b.quantized == ["quantized (TensorCoreFP8Layout)"]
    assert any("quantized (TensorCoreFP8Layout)" in n and "dequantized" in n for n in b.notes)
    terms = b.base_terms["lycoris_transformer_blocks_0_attn_to_out_0"]
    u, s, vh = torch.linalg.svd(qt.dequantize().double(), full_matrices=False)
    assert rel(prefix(terms.p, terms.lam, terms.q, 4), (u[:, :4] * s[:4]) @ vh[:4]) < 1e-6
