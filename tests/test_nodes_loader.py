"""T-LoRA Loader in-process: real files (devkit.tlora_files), tiny real models, ComfyUI's folder paths."""

from __future__ import annotations

import pytest
import torch

from devkit.host import pack_module


@pytest.fixture
def loras(comfy, tmp_path, monkeypatch):
    """A private ``loras`` model folder (and SVD cache) for the loader."""
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.setenv("COMFYUI_TLORA_CACHE", str(tmp_path / "cache"))
    return folder


@pytest.fixture(scope="module")
def nodes(comfy):
    return pack_module("nodes.loader"), pack_module("nodes.schedule")


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
    matched = int(lines[2].split()[1])
    assert matched > 0 and lines[2] == f"modules: {matched} matched, 0 not matched"
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
    assert "  alpha = 3.0  (T-LoRA Schedule node)" in info.splitlines()
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
