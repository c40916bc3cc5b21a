"""Small real diffusion models built from ComfyUI's own model classes, deterministic per seed.

ComfyUI's layers skip weight initialisation (weights come from checkpoints), so every parameter
is filled here from a seeded generator with a fan-in scaled normal: outputs stay O(1) and a
LoRA's effect is visible.
"""

from __future__ import annotations

import math

import torch

FLUX_TINY = dict(
    image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=32, context_in_dim=64,
    hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
    theta=10000, qkv_bias=True, guidance_embed=False,
)

SDXL_TINY = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=32,
    num_res_blocks=[1, 1], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
    channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=True,
    context_dim=64, num_head_channels=16, use_temporal_attention=False, use_temporal_resblock=False,
)


def seeded_init_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("scale") or "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_flux(seed: int = 0, dtype=torch.float32, **overrides):
    """A Flux-like DiT (ComfyUI ``model_base.Flux``), wrapped in a ModelPatcher."""
    import comfy.supported_models

    cfg = dict(FLUX_TINY, **overrides)
    config = comfy.supported_models.Flux(cfg)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device="cpu")
    seeded_init_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return _patcher(model)


def tiny_sdxl(seed: int = 0, dtype=torch.float32, **overrides):
    """An SDXL-like UNet (ComfyUI ``model_base.SDXL``, discrete eps sampling), in a ModelPatcher."""
    import comfy.supported_models

    cfg = dict(SDXL_TINY, **overrides)
    config = comfy.supported_models.SDXL(cfg)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device="cpu")
    seeded_init_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return _patcher(model)


def flux_conditioning(batch: int = 1, tokens: int = 8, seed: int = 1):
    """Positive/negative conditioning in ComfyUI's list format for the tiny Flux model."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda: [[torch.randn(batch, tokens, FLUX_TINY["context_in_dim"], generator=gen),
                     {"pooled_output": torch.randn(batch, FLUX_TINY["vec_in_dim"], generator=gen)}]]
    return make(), make()


def sdxl_conditioning(batch: int = 1, tokens: int = 8, seed: int = 1):
    """Positive/negative conditioning for the tiny SDXL model (context + ``y`` vector)."""
    gen = torch.Generator().manual_seed(seed)

    def make():
        return [[torch.randn(batch, tokens, SDXL_TINY["context_dim"], generator=gen),
                 {"pooled_output": torch.randn(batch, 1280, generator=gen), "width": 64, "height": 64,
                  "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}]]

    return make(), make()
