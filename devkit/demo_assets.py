"""Generated stand-ins for a real SD1.5 checkpoint and a SimpleTuner T-LoRA (demo and server tests).

Nothing may be downloaded, so the demo makes its own models, small enough for a 2-core CPU, in the
formats ComfyUI's own loaders auto-detect:

- ``checkpoints/tlora_demo_sd15_tiny.safetensors``: one file with UNet + CLIP-L + VAE, loaded by
  ``CheckpointLoaderSimple``. The UNet is an SD1.5 UNet (model_channels 320, context 768, what
  ``SD15.unet_config`` requires) cut down to one level, one res block and one transformer block,
  so ``model_detection`` finds ``SD15`` (~19M params, discrete eps sampling). Its seeded random
  weights are wired into a crude denoiser (wire_denoiser_) so that sampling converges and the
  picture comes from the transformer blocks, where the T-LoRA acts, and the T-LoRA's target
  weights get well-separated top singular values (separate_spectra_), like trained weights. CLIP-L is ComfyUI's full-size
  one (its config is fixed) with seeded random weights, stored fp16. The VAE is a TAESD (detected
  from its ``taesd_decoder.*`` keys) whose decoder maps each latent channel to a colour, smoothed,
  so differences between latents are visible differences between images. ~330 MB, mostly CLIP.
- ``loras/tlora_demo_sd15_lycoris.safetensors``: a T-LoRA made by lycoris-lora exactly as
  SimpleTuner makes one (``apply_preset`` + ``create_lycoris(..., algo="tlora")`` on the
  diffusers-named modules, ``save_weights`` with ``lycoris_config`` metadata), on the UNet *as
  ComfyUI loads it back* (the loader rebuilds the frozen base terms from an SVD of these weights).
  Its trained values are a deterministic perturbation of lycoris' SVD initialisation: the
  singular-value scales ``lambda`` grow with the rank index and ``P``/``Q`` turn, so the later
  ranks (which the schedule switches off at high noise) carry most of the effect: sampled with the
  mask the picture changes, with every rank on at every step it comes out saturated ("burnt").

Files are made once per ``VERSION`` in a shared cache (``.cache/demo-assets/``) and linked into
each server's ``models/`` folder; make_demo_assets() is idempotent and cheap after the first call.
It imports ComfyUI in-process (devkit.host.load_comfy()).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import types
from pathlib import Path

import torch

from .host import ROOT

VERSION = "3"  # bump when anything below changes the files
CACHE_DIR = ROOT / ".cache" / "demo-assets"

CHECKPOINT = "tlora_demo_sd15_tiny.safetensors"  # under models/checkpoints/
LORA = "tlora_demo_sd15_lycoris.safetensors"  # under models/loras/
SEED = 20250701
# Tuned by eye on 128x128, 6-step euler/normal, cfg 5 runs: a clear picture-level effect masked,
# a saturated ("burnt") one unmasked. RESIDUAL_GAIN/OUT_NOISE: see wire_denoiser_;
# LAMBDA_GAIN/PQ_TURN: see write_tlora; PALETTE/DECODER_GAIN: see build_vae.
RESIDUAL_GAIN = 0.15
OUT_NOISE = 0.05
LAMBDA_GAIN = (2.5, 4.0)
PQ_TURN = 0.5
PALETTE = [[0.9, 0.1, -0.4], [-0.4, 0.8, 0.1], [0.0, -0.3, 0.9], [0.4, 0.4, 0.4]]  # latent channel -> RGB
DECODER_GAIN = 0.15

# The SimpleTuner LyCORIS config (its lycoris_config.json); stored verbatim as the file's metadata.
# tlora_min_rank/tlora_alpha differ from the defaults (1, 1.0) so a loader that ignores the
# metadata is caught.
LYCORIS_CONFIG = {
    "algo": "tlora",
    "multiplier": 1.0,
    "linear_dim": 16,
    "linear_alpha": 16,
    "tlora_min_rank": 2,
    "tlora_alpha": 1.5,
    "apply_preset": {"target_module": ["Attention", "FeedForward"]},
}

# The same UNet as diffusers' UNet2DConditionModel config: the module names SimpleTuner's files carry.
DIFFUSERS_UNET_CONFIG = dict(sample_size=32, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
                             up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(320,), layers_per_block=1,
                             cross_attention_dim=768, attention_head_dim=8, mid_block_type=None)

# An SD1.5 UNet config (as comfy.model_detection.detect_unet_config reports it), one level deep.
UNET_CONFIG = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], transformer_depth=[1],
    transformer_depth_output=[1, 1], channel_mult=[1], transformer_depth_middle=-2,
    use_linear_in_transformer=False, context_dim=768, use_temporal_resblock=False, use_temporal_attention=False,
)


def make_demo_assets(dest_models_dir, cache_dir: Path | None = None, force: bool = False) -> dict:
    """Ensure the demo checkpoint and T-LoRA exist under ``dest_models_dir`` (a ComfyUI models/ dir).

    Returns ``{"checkpoint": <name in checkpoints/>, "lora": <name in loras/>,
    "lycoris_config": dict, "paths": {"checkpoint": Path, "lora": Path}}``. The names are what
    workflows pass to ``CheckpointLoaderSimple.ckpt_name`` and the LoRA loaders' ``lora_name``.
    """
    cache = Path(cache_dir or CACHE_DIR) / f"v{VERSION}"
    generate(cache, force=force)
    dest = Path(dest_models_dir)
    paths = {}
    for kind, folder, name in (("checkpoint", "checkpoints", CHECKPOINT), ("lora", "loras", LORA)):
        src = cache / folder / name
        dst = dest / folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if force or not (dst.exists() and dst.stat().st_size == src.stat().st_size
                         and dst.stat().st_mtime >= src.stat().st_mtime):
            _link(src, dst)
        paths[kind] = dst
    return {"checkpoint": CHECKPOINT, "lora": LORA, "lycoris_config": dict(LYCORIS_CONFIG), "paths": paths}


def generate(cache: Path, force: bool = False) -> None:
    """Write the files into ``cache`` unless its stamp says this VERSION is already there."""
    stamp = cache / "stamp.json"
    ckpt = cache / "checkpoints" / CHECKPOINT
    lora = cache / "loras" / LORA
    if not force and stamp.exists() and ckpt.exists() and lora.exists():
        try:
            if json.loads(stamp.read_text()).get("version") == VERSION:
                return
        except ValueError:
            pass
    from . import host

    host.load_comfy()
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    lora.parent.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    _write_atomic(ckpt, write_checkpoint)
    _write_atomic(lora, lambda p: write_tlora(ckpt, p))
    stamp.write_text(json.dumps({"version": VERSION, "checkpoint": CHECKPOINT, "lora": LORA,
                                 "lycoris_config": LYCORIS_CONFIG}, indent=1))


# --- the checkpoint ---------------------------------------------------------------------------

def build_unet(seed: int = SEED):
    """The tiny SD1.5 UNet as a ComfyUI ModelPatcher (fp32, seeded fan-in normal weights)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from .tiny_models import seeded_init_

    config = comfy.supported_models.SD15(UNET_CONFIG)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device="cpu")
    seeded_init_(model.diffusion_model, seed)
    separate_spectra_(model.diffusion_model, LYCORIS_CONFIG["linear_dim"])
    wire_denoiser_(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def diffusers_unet(model_patcher):
    """The demo UNet as diffusers' ``UNet2DConditionModel`` with the ComfyUI model's weights, by
    diffusers' own ldm converter."""
    from .families import twin
    from .families.sdxl import ldm_converter

    return twin(model_patcher, "UNet2DConditionModel", DIFFUSERS_UNET_CONFIG, ldm_converter(DIFFUSERS_UNET_CONFIG))


def separate_spectra_(unet, rank: int, step: float = 0.05) -> None:
    """Space the top ``rank + 1`` singular values of the T-LoRA's target weights ``step * s_1`` apart.

    A LyCORIS T-LoRA file lacks its frozen base terms; loaders rebuild them from the top singular
    triplets of the base weight, which fixes the rank-k split only if s_k and s_k+1 are apart.
    Trained weights have decaying spectra; a random matrix's top singular values nearly coincide,
    so the split would be ill-conditioned (and the loader rightly warns). Only the top values move
    (the singular vectors stay), in float64, deterministically.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see write_tlora: multi-threaded SVD is very slow with ComfyUI imported
    try:
        with torch.no_grad():
            for name, p in sorted(unet.named_parameters(), key=lambda kv: kv[0]):
                if p.ndim != 2 or ".transformer_blocks." not in name or not (".attn" in name or ".ff." in name):
                    continue
                u, sv, vh = torch.linalg.svd(p.double(), full_matrices=False)
                k = min(rank + 1, sv.numel())
                floor = float(sv[k]) if k < sv.numel() else 0.0
                sv[:k] = floor + step * float(sv[0]) * torch.arange(k, 0, -1, dtype=torch.float64)
                p.copy_((u * sv) @ vh)
    finally:
        torch.set_num_threads(threads)


def wire_denoiser_(unet) -> None:
    """Turn the random UNet into a crude denoiser whose picture comes from its transformer blocks.

    A purely random UNet predicts noise unrelated to its input, so sampling ends where it started
    (the seeded noise) and an adapter's effect is lost in it. Here latent channels 0-3 (and their
    negatives, 4-7, so that the final SiLU cancels: silu(z) - silu(-z) = z) run straight from the
    input to the output: the prediction is the (normalised) input itself, the ideal noise guess for
    data concentrated at zero, and sampling converges. The only other writers to those channels are
    the transformer blocks' ``proj_out`` rows (scaled by RESIDUAL_GAIN) and a little of the other
    channels (OUT_NOISE): the final image is what the attention / feed-forward layers (the T-LoRA
    targets, conditioned on the prompt) add.
    """
    ch = 4
    path = unet.out[0].num_channels // unet.out[0].num_groups  # the output GroupNorm's first group
    with torch.no_grad():
        conv_in = unet.input_blocks[0][0]
        conv_in.weight[:path].zero_()
        conv_in.bias[:path].zero_()
        for c in range(ch):
            conv_in.weight[c, c, 1, 1] = 1.0
            conv_in.weight[ch + c, c, 1, 1] = -1.0
        for block in list(unet.input_blocks[1:]) + list(unet.output_blocks):
            for layer in block:
                if hasattr(layer, "out_layers"):  # ResBlock: keep its residual off the path
                    layer.out_layers[3].weight[:path].zero_()
                    layer.out_layers[3].bias[:path].zero_()
                    skip = layer.skip_connection
                    if isinstance(skip, torch.nn.Conv2d):  # cat(h, skip) -> average both copies
                        half = skip.weight.shape[1] // 2
                        skip.weight[:path].zero_()
                        skip.bias[:path].zero_()
                        for c in range(2 * ch):
                            skip.weight[c, c] = 0.5
                            skip.weight[c, half + c] = 0.5
                if hasattr(layer, "proj_out"):  # SpatialTransformer: writes +d / -d on the path
                    w, b = layer.proj_out.weight, layer.proj_out.bias
                    w[:ch] *= RESIDUAL_GAIN
                    b[:ch] *= RESIDUAL_GAIN
                    w[ch: 2 * ch] = -w[:ch]
                    b[ch: 2 * ch] = -b[:ch]
                    w[2 * ch: path].zero_()
                    b[2 * ch: path].zero_()
        norm, conv_out = unet.out[0], unet.out[2]
        norm.weight[:path] = 1.0
        norm.bias[:path] = 0.0
        conv_out.weight.mul_(OUT_NOISE)
        conv_out.bias.zero_()
        for c in range(ch):
            conv_out.weight[c, c, 1, 1] += 1.0
            conv_out.weight[c, ch + c, 1, 1] -= 1.0


def build_clip(model_patcher, seed: int = SEED + 1):
    """ComfyUI's SD1.5 text encoder (full-size CLIP-L, its config is fixed) with seeded weights."""
    import comfy.sd

    from .tiny_models import seeded_init_

    clip = comfy.sd.CLIP(model_patcher.model.model_config.clip_target(), parameters=0)
    seeded_init_(clip.cond_stage_model, seed)
    return clip


def build_vae(seed: int = SEED + 2):
    """A TAESD whose decoder maps each latent channel to a fixed colour, smoothed (see module doc)."""
    import comfy.latent_formats
    import comfy.sd
    import comfy.taesd.taesd

    from .tiny_models import seeded_init_

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    seeded_init_(taesd.taesd_encoder, seed)  # the encoder is not used by the demo
    dec = taesd.taesd_decoder
    rgb = torch.tensor(PALETTE)  # (4 latent channels, RGB)
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        # conv(4 -> 64): channels 2c / 2c+1 carry the positive / negative part of colour c,
        # so the ReLUs and the zeroed Blocks (relu(0 + x) = x for x >= 0) pass them unchanged.
        for c in range(3):
            dec[1].weight[2 * c, :, 1, 1] = DECODER_GAIN * rgb[:, c]
            dec[1].weight[2 * c + 1, :, 1, 1] = -DECODER_GAIN * rgb[:, c]
        for i in (7, 12, 17):  # the conv after each nearest-neighbour upsample: a blur
            for ch in range(6):
                dec[i].weight[ch, ch] = blur
        for c in range(3):  # conv(64 -> 3): recombine, centred on grey
            dec[19].weight[c, 2 * c, 1, 1] = 1.0
            dec[19].weight[c, 2 * c + 1, 1, 1] = -1.0
            dec[19].bias[c] = 0.5
        taesd.vae_scale.fill_(comfy.latent_formats.SD15().scale_factor)
        taesd.vae_shift.fill_(0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


def write_checkpoint(path: Path) -> None:
    """UNet (fp32) + CLIP-L (fp16) + TAESD in one checkpoint, via ComfyUI's own save_checkpoint."""
    import comfy.sd

    model = build_unet()
    clip = build_clip(model)
    clip.cond_stage_model.to(torch.float16)
    vae = build_vae()
    comfy.sd.save_checkpoint(str(path), model, clip, vae,
                             metadata={"tlora_demo": f"generated by devkit/demo_assets.py v{VERSION}"})


# --- the T-LoRA -------------------------------------------------------------------------------

def write_tlora(checkpoint: Path, path: Path, seed: int = SEED + 3) -> None:
    """A SimpleTuner-style LyCORIS T-LoRA for the UNet in ``checkpoint`` (see module doc)."""
    import comfy.sd
    import lycoris
    from lycoris import LycorisNetwork, create_lycoris

    model = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    root = diffusers_unet(model)
    cfg = dict(LYCORIS_CONFIG)
    # SimpleTuner: apply the preset, pop the positional values, pass the rest as keyword arguments.
    # apply_preset sets class attributes; restore them so other in-process users are unaffected.
    saved = {k: getattr(LycorisNetwork, k) for k in dir(LycorisNetwork) if k.isupper()}
    try:
        with fast_lycoris():
            LycorisNetwork.apply_preset(cfg["apply_preset"])
            multiplier, dim, alpha = cfg.pop("multiplier"), cfg.pop("linear_dim"), cfg.pop("linear_alpha")
            network = create_lycoris(root, multiplier, dim, alpha, **cfg)
            network.apply_to()  # registers the modules with the network (its state_dict is the file)
            network.restore()
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    modules = [m for m in network.loras if isinstance(m, lycoris.TLoraModule)]
    if not modules:
        raise RuntimeError("lycoris-lora wrapped no module of the demo UNet")
    gen = torch.Generator().manual_seed(seed)
    # rank i's lambda grows by LAMBDA_GAIN[0] .. [1]: the later ranks (masked at high noise) dominate.
    gains = LAMBDA_GAIN[0] + (LAMBDA_GAIN[1] - LAMBDA_GAIN[0]) * torch.linspace(0, 1, dim) ** 1.5
    with torch.no_grad():
        for m in sorted(modules, key=lambda m: m.lora_name):
            m.lambda_layer.mul_(gains.unsqueeze(0))
            for layer in (m.q_layer, m.p_layer):
                w = layer.weight
                noise = torch.randn(w.shape, generator=gen)
                layer.weight.copy_(w + PQ_TURN * noise / math.sqrt(max(w.shape)))
    network.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(LYCORIS_CONFIG)})


@contextlib.contextmanager
def fast_lycoris():
    """lycoris-lora T-LoRA set-up in a process that imported ComfyUI: quiet and in seconds.

    T-LoRA's init runs one small SVD and a gc.collect() per module. With ComfyUI imported, a
    2-thread SVD takes seconds (1 thread: ~50 ms) and each collect ~0.5 s; lycoris also logs every
    step at INFO to stdout. Speed and noise only (one thread also keeps the SVDs reproducible).
    """
    import lycoris.logging
    import lycoris.modules.tlora

    threads, tlora_gc, level = torch.get_num_threads(), lycoris.modules.tlora.gc, lycoris.logging.logger.level
    try:
        torch.set_num_threads(1)
        lycoris.modules.tlora.gc = types.SimpleNamespace(collect=lambda: 0)
        lycoris.logging.logger.setLevel(logging.WARNING)
        yield
    finally:
        torch.set_num_threads(threads)
        lycoris.modules.tlora.gc = tlora_gc
        lycoris.logging.logger.setLevel(level)


# --- helpers ------------------------------------------------------------------------------------

def _write_atomic(path: Path, writer) -> None:
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")  # keeps the suffix: writers switch on it
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> None:
    """Hard link (no extra disk), else a copy; replaced atomically."""
    tmp = dst.with_name(f".tmp{os.getpid()}.{dst.name}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
