"""T-LoRA Loader in-process: real files (devkit.tlora_files), tiny real models, ComfyUI's folder paths."""

from __future__ import annotations

import pytest
import torch

from devkit.host import pack_module


@pytest.fixture(scope="module")
def nodes(comfy):
    """(the loader's module, the schedule and preview nodes' modules as one namespace)."""
    import types

    return pack_module("nodes.loader"), types.SimpleNamespace(**{**vars(pack_module("nodes.schedule")),
                                                                 **vars(pack_module("nodes.preview"))})


@pytest.fixture(scope="module")
def lycoris_file(comfy, tmp_path_factory):
    """A SimpleTuner T-LoRA of the tiny Flux: rank 8, min_rank 2, alpha 1.5 in its lycoris_config metadata."""
    from devkit.tiny_models import tiny_flux
    from devkit.tlora_files import write_lycoris

    path = tmp_path_factory.mktemp("files") / "flux_st.safetensors"
    write_lycoris(tiny_flux(seed=0), path, rank=8, min_rank=2, tlora_alpha=1.5)
    return path


def put(loras, src, name):
    (loras / name).write_bytes(src.read_bytes())
    return name


def load(nodes, model, name, strength=1.0, **schedule):
    loader, sch = nodes
    overrides = None
    if schedule:
        values = dict(max_rank=0, min_rank=1, alpha=1.0, mode="timestep", max_timestep=1000)
        values.update(schedule)
        overrides = sch.TLoraSchedule.execute(**values).args[0]
    return loader.TLoraLoader.execute(model, name, strength, schedule=overrides).args


def test_loader_applies_the_files_own_schedule(nodes, loras, lycoris_file, tiny_flux):
    name = put(loras, lycoris_file, "st.safetensors")
    model, info = load(nodes, tiny_flux, name)
    (tl,) = nodes[1].loaded_tloras(model)
    s = tl.schedule
    assert (tl.name, tl.strength) == ("st.safetensors", 1.0)
    assert (s.max_rank, s.min_rank, s.alpha, s.mode, s.max_timestep) == (8, 2, 1.5, "timestep", 1000)
    assert "lycoris_config" in s.sources["min_rank"] and "lycoris_config" in s.sources["alpha"]
    assert nodes[1].loaded_tloras(tiny_flux) == []  # the input model is untouched
    lines = info.splitlines()
    assert lines[0] == "T-LoRA: st.safetensors"
    assert "LyCORIS" in lines[1] and "rank 8" in lines[1]
    assert lines[2] == "model: Flux.1 (Flux); mask timestep: t = T * sigma (flow matching), T = 1000"
    matched = int(lines[3].split()[1])
    assert matched > 0 and lines[3] == f"modules: {matched} matched, 0 not matched"
    assert f"  min_rank = 2  ({s.sources['min_rank']})" in lines and f"  alpha = 1.5  ({s.sources['alpha']})" in lines
    table = pack_module("tlora_core.schedule").rank_table(s)
    assert "active rank at t: " + ", ".join(f"{t:g}: {r}" for t, r in table) in lines
    assert table[-1][1] == 2 and table[0][1] == 8


def test_schedule_node_overrides_the_file(nodes, loras, lycoris_file, tiny_flux):
    name = put(loras, lycoris_file, "st.safetensors")
    model, info = load(nodes, tiny_flux, name, max_rank=0, min_rank=1, alpha=3.0, mode="step_index")
    (tl,) = nodes[1].loaded_tloras(model)
    s = tl.schedule
    assert (s.max_rank, s.min_rank, s.alpha, s.mode) == (8, 1, 3.0, "step_index")
    assert s.sources["alpha"] == s.sources["min_rank"] == s.sources["mode"] == "T-LoRA Schedule node"
    assert s.sources["max_rank"] != "T-LoRA Schedule node"  # 0 kept the file's rank
    assert "  alpha = 3  (T-LoRA Schedule node)" in info.splitlines()
    with pytest.raises(ValueError, match="exceeds the rank of st.safetensors"):
        load(nodes, tiny_flux, name, max_rank=16)


def test_loaded_model_samples_differently(nodes, loras, lycoris_file, tiny_flux):
    import comfy.sample

    from devkit.tiny_models import flux_conditioning

    name = put(loras, lycoris_file, "st.safetensors")
    pos, neg = flux_conditioning()
    latent = torch.zeros(1, 16, 8, 8)

    def run(model):
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample(model, noise, 4, 2.0, "euler", "simple", pos, neg, latent, disable_pbar=True, seed=0)

    base = run(tiny_flux)
    with_tlora = run(load(nodes, tiny_flux, name)[0])
    off = run(load(nodes, tiny_flux, name, strength=0.0)[0])
    assert torch.isfinite(with_tlora).all() and not torch.allclose(with_tlora, base)
    assert torch.equal(off, base)
    # apply "merge": the same result through the weights, which are as before afterwards
    weights = {k: v.clone() for k, v in tiny_flux.model.state_dict().items()}
    merged_model, info = nodes[0].TLoraLoader.execute(tiny_flux, name, 1.0, apply="merge").args
    assert "merging the active ranks into the weights" in info
    merged = run(merged_model)
    assert (merged - with_tlora).norm() <= 1e-4 * (with_tlora - base).norm()
    assert all(torch.equal(v, weights[k]) for k, v in tiny_flux.model.state_dict().items())


def test_wrong_model_corrupt_file_and_outside_paths_are_clear_errors(nodes, loras, lycoris_file, tiny_sdxl):
    name = put(loras, lycoris_file, "flux_only.safetensors")
    with pytest.raises(ValueError, match=r"flux_only\.safetensors.*nothing matches this model"):
        load(nodes, tiny_sdxl, name)
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"broken\.safetensors"):
        load(nodes, tiny_sdxl, "broken.safetensors")
    with pytest.raises(ValueError, match="not in the loras model folder"):
        load(nodes, tiny_sdxl, "../loras/flux_only.safetensors")
    loader = nodes[0].TLoraLoader
    assert loader.validate_inputs(lora_name="flux_only.safetensors") is True
    assert "not a file of the loras model folder" in loader.validate_inputs(lora_name="/etc/passwd")


def test_a_changed_file_is_fingerprinted_anew(nodes, loras, lycoris_file):
    loader = nodes[0].TLoraLoader
    name = put(loras, lycoris_file, "st.safetensors")
    first = loader.fingerprint_inputs(lora_name=name, strength_model=1.0)
    assert loader.fingerprint_inputs(lora_name=name, strength_model=1.0) == first
    data = (loras / name).read_bytes()
    (loras / name).write_bytes(data + b" ")  # same name, new content
    assert loader.fingerprint_inputs(lora_name=name, strength_model=1.0) != first


def test_save_node_writes_a_copy_that_loads_without_svd(nodes, loras, lycoris_file, tiny_flux, monkeypatch):
    """The copy is in the loras folder under the name the node returns; the Loader reads it with no
    SVD at all and attaches the very same adapters as from the original."""
    save = pack_module("nodes.save").TLoraSaveSelfContained
    keymap, svd = pack_module("comfy_glue.binding"), pack_module("tlora_core.svd")
    name = put(loras, lycoris_file, "st.safetensors")
    out = save.execute(tiny_flux, name, "", False)
    assert out.args == ("st_selfcontained.safetensors",)
    assert "st_selfcontained.safetensors" in out.ui.as_dict()["text"][0]
    original, _ = load(nodes, tiny_flux, name)

    def no_svd(*a, **k):
        raise AssertionError("SVD called for a self-contained copy")

    monkeypatch.setattr(svd, "base_terms", no_svd)
    copy, info = load(nodes, tiny_flux, "st_selfcontained.safetensors")
    assert "with stored base terms" in info
    patcher = pack_module("comfy_glue.patcher")
    (a,), (b,) = patcher.tlora_patches(original), patcher.tlora_patches(copy)
    assert (a.schedule.min_rank, a.schedule.alpha) == (b.schedule.min_rank, b.schedule.alpha) == (2, 1.5)

    def adapters(runtime):
        return {(m, e.out_slice): e.adapter for m, entries in runtime.modules.items() for e in entries}

    ta, tb = adapters(a), adapters(b)
    assert ta.keys() == tb.keys() and len(ta) > 0
    for key, ad in tb.items():
        for k in (1, 4, 8):
            assert torch.allclose(ad.delta_weight(k), ta[key].delta_weight(k), rtol=0, atol=1e-6), key


def test_save_node_refuses_overwrites_other_formats_and_odd_names(nodes, loras, lycoris_file, tiny_flux, tmp_path):
    from devkit.tlora_files import write_kohya

    save = pack_module("nodes.save").TLoraSaveSelfContained
    name = put(loras, lycoris_file, "st.safetensors")
    (loras / "taken.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"taken\.safetensors already exists"):
        save.execute(tiny_flux, name, "taken", False)
    assert (loras / "taken.safetensors").read_bytes() == b"keep me"
    assert save.execute(tiny_flux, name, "taken", True).args == ("taken.safetensors",)
    assert (loras / "taken.safetensors").stat().st_size > 1000
    with pytest.raises(ValueError, match="must be a plain file name"):
        save.execute(tiny_flux, name, "../outside", False)
    with pytest.raises(ValueError, match="would replace st.safetensors itself"):
        save.execute(tiny_flux, name, "st", True)
    kohya = put(loras, write_kohya(tiny_flux, tmp_path / "k.safetensors"), "kohya.safetensors")
    with pytest.raises(ValueError, match=r"kohya\.safetensors .*needs no self-contained copy"):
        save.execute(tiny_flux, kohya, "", False)
