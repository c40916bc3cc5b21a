"""`make demo`: its generated models load in ComfyUI's own loaders, and its workflow, run on a real
server, gives three different images, the rank chart and the schedule the trainers' formula gives."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from devkit import demo_assets
from devkit.host import ROOT


def _demo_module():
    spec = importlib.util.spec_from_file_location("tlora_demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(comfy, tmp_path_factory):
    return demo_assets.make_demo_assets(tmp_path_factory.mktemp("models"))


def test_checkpoint_is_detected_by_comfyui_as_sd15_with_clip_and_vae(comfy, assets):
    import comfy.model_sampling
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(assets["paths"]["checkpoint"]))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert isinstance(model.model.model_sampling, comfy.model_sampling.EPS)
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a fox"))[0][0]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert params < 30e6, params


def test_tlora_file_is_simpletuner_lycoris_and_maps_onto_the_unet(comfy, assets):
    import comfy.lora
    import comfy.sd
    from safetensors import safe_open

    with safe_open(str(assets["paths"]["lora"]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["lycoris_config"]) == demo_assets.LYCORIS_CONFIG
    modules = {k.split(".", 1)[0] for k in tensors}
    assert modules and all(m.startswith("lycoris_") for m in modules)
    R = demo_assets.LYCORIS_CONFIG["linear_dim"]
    for m in modules:
        assert tensors[f"{m}.q_layer.weight"].shape[0] == R
        assert tensors[f"{m}.p_layer.weight"].shape[1] == R
        assert tensors[f"{m}.lambda_layer"].shape == (1, R)
        assert f"{m}.alpha" in tensors
    model = comfy.sd.load_checkpoint_guess_config(str(assets["paths"]["checkpoint"]), output_vae=False,
                                                  output_clip=False)[0]
    keymap = comfy.lora.model_lora_keys_unet(model.model, {})
    assert modules <= set(keymap), sorted(modules - set(keymap))[:5]
    # every attention and feed-forward linear of the transformer blocks (3 blocks x 10), as the preset says
    assert len(modules) == 30


def test_assets_are_made_once(assets, tmp_path):
    before = {k: p.stat().st_mtime_ns for k, p in assets["paths"].items()}
    again = demo_assets.make_demo_assets(assets["paths"]["checkpoint"].parents[1])
    assert {k: p.stat().st_mtime_ns for k, p in again["paths"].items()} == before
    other = demo_assets.make_demo_assets(tmp_path / "models")  # another server's models/: linked, same bytes
    for k in ("checkpoint", "lora"):
        assert other["paths"][k].read_bytes() == assets["paths"][k].read_bytes()


@pytest.fixture(scope="module")
def demo_run(comfy_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-out")
    summary = _demo_module().run_demo(out, server=comfy_server, log=lambda *a: None)
    return out, summary


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


@pytest.mark.server
def test_demo_writes_three_different_images_and_the_chart(demo_run):
    out, summary = demo_run
    images = {k: _pixels(out / f"{k}.png") for k in ("tlora_masked", "lora_unmasked", "base")}
    for name, img in images.items():
        assert img.shape == (128, 128, 3), name
        assert img.std() > 0.05, f"{name} is flat"
    diff = lambda a, b: float(abs(images[a] - images[b]).mean())
    # the adapter changes the picture, and masking changes it again (pixel values 0..1)
    assert diff("tlora_masked", "base") > 0.03
    assert diff("lora_unmasked", "base") > 0.03
    assert diff("tlora_masked", "lora_unmasked") > 0.03
    chart = _pixels(out / "rank_per_step.png")
    assert chart.shape[0] > 100 and chart.shape[1] > 200 and chart.std() > 0.01
    assert (out / "comparison.png").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.server
def test_demo_ranks_are_the_trained_schedule_at_ksamplers_sigmas(comfy, assets, demo_run):
    import comfy.samplers
    import comfy.sd

    _, s = demo_run
    cfg = s["lycoris_config"]
    R, r_min, alpha = cfg["linear_dim"], cfg["tlora_min_rank"], cfg["tlora_alpha"]
    model = comfy.sd.load_checkpoint_guess_config(str(assets["paths"]["checkpoint"]), output_vae=False,
                                                  output_clip=False)[0]
    sigmas = comfy.samplers.KSampler(model, steps=s["steps"], device="cpu", sampler=s["sampler_name"],
                                     scheduler=s["scheduler"], denoise=s["denoise"]).sigmas.float()[:-1]
    assert len(s["sigmas"]) == s["steps"]
    assert s["sigmas"] == pytest.approx(sigmas.tolist(), abs=1e-4)
    ts = model.model.model_sampling.timestep(sigmas).tolist()
    assert s["timesteps"] == pytest.approx(ts, abs=0.05)
    # the trainers' formula (LyCORIS / SimpleTuner truncate t), with the file's settings
    expected = [min(R, math.floor(((1000 - int(t)) / 1000) ** alpha * (R - r_min)) + r_min) for t in ts]
    assert s["ranks"] == expected
    assert s["ranks"][0] == r_min and s["ranks"][-1] == R and s["max_rank"] == R
    # the loader took those settings from the file's lycoris_config metadata
    assert f"min_rank = {r_min}" in s["loader_info"] and f"alpha = {alpha}" in s["loader_info"]


def _reference_images(assets, prompt) -> dict:
    """The demo's three samples computed here with lycoris-lora's own T-LoRA modules.

    On every model call: the trainers' rank for that sigma (lycoris' compute_timestep_mask at
    t = model_sampling.timestep(sigma), as SimpleTuner's pipelines do), lycoris' get_diff_weight
    under that mask added to the weights; unmasked: the mask of all ones. Quantised like SaveImage.
    """
    import comfy.lora
    import comfy.sample
    import comfy.sd
    import numpy as np
    from lycoris import create_lycoris_from_weights
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(assets["paths"]["checkpoint"]))
    with demo_assets.fast_lycoris():
        network, _ = create_lycoris_from_weights(1.0, str(assets["paths"]["lora"]), demo_assets.diffusers_unet(model))
    keymap = comfy.lora.model_lora_keys_unet(model.model, {})
    cfg = assets["lycoris_config"]
    R, r_min, alpha = cfg["linear_dim"], cfg["tlora_min_rank"], cfg["tlora_alpha"]

    def deltas(mask):
        set_timestep_mask(mask)
        try:
            return {keymap[m.lora_name]: m.get_diff_weight()[0].detach().float() for m in network.loras}
        finally:
            clear_timestep_mask()

    params = dict(model.model.named_parameters())
    cache = {}

    def swap(masked: bool):
        def wrapper(apply_model, args):
            ts = model.model.model_sampling.timestep(args["timestep"]).tolist()
            assert len(set(ts)) == 1, ts  # cond and uncond of one step
            t = int(ts[0]) if masked else -1
            if t not in cache:
                cache[t] = deltas(compute_timestep_mask(t, 1000, R, r_min, alpha) if masked else torch.ones(1, R))
            orig = {k: params[k].detach().clone() for k in cache[t]}
            with torch.no_grad():
                for k, d in cache[t].items():
                    params[k].copy_(orig[k] + d)
            try:
                return apply_model(args["input"], args["timestep"], **args["c"])
            finally:
                with torch.no_grad():
                    for k, w in orig.items():
                        params[k].copy_(w)
        return wrapper

    ks = next(n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler")
    size = next(n["inputs"] for n in prompt.values() if n["class_type"] == "EmptyLatentImage")
    encode = lambda node: clip.encode_from_tokens_scheduled(clip.tokenize(prompt[node]["inputs"]["text"]))
    positive, negative = encode(ks["positive"][0]), encode(ks["negative"][0])
    latent = torch.zeros(1, 4, size["height"] // 8, size["width"] // 8)
    images = {}
    for name, masked in (("base", None), ("tlora_masked", True), ("lora_unmasked", False)):
        m = model.clone()
        if masked is not None:
            m.set_model_unet_function_wrapper(swap(masked))
        noise = comfy.sample.prepare_noise(latent, ks["seed"])
        out = comfy.sample.sample(m, noise, ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], positive,
                                  negative, latent, denoise=ks["denoise"], disable_pbar=True, seed=ks["seed"])
        image = vae.decode(out)[0].detach().cpu().numpy()
        images[name] = np.clip(255.0 * image, 0, 255).astype(np.uint8).astype(np.float32) / 255
    return images


@pytest.mark.server
def test_demo_images_are_what_lycoris_own_tlora_gives(comfy, assets, demo_run):
    """The server's pictures equal sampling with lycoris-lora's own modules and masks (to 8-bit rounding)."""
    out, _ = demo_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only spin against each other on a busy 2-core box
    try:
        reference = _reference_images(assets, _demo_module().load_workflow(assets))
    finally:
        torch.set_num_threads(threads)
    for name, ref in reference.items():
        got = _pixels(out / f"{name}.png")
        assert abs(got - ref).max() <= 2 / 255 + 1e-6, name
        assert abs(got - ref).mean() < 1e-3, name
