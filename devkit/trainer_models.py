"""Tiny real ComfyUI models of the families the 2026 T-LoRA trainers train (tests of their files):

- ``tiny_anima``: the Anima DiT (the Anima kohya fork). ComfyUI 0.28 has it (``supported_models.Anima``:
  ``model_base.Anima``, FLOW sampling, multiplier 1.0, shift 3.0); older hosts have its base, the
  Cosmos-Predict2 ``MiniTrainDIT`` (same block names, ``CosmosT2IPredict2``), given Anima's sampling
  the way ComfyUI's ModelSamplingSD3 node patches one (multiplier 1.0, shift 3.0). Either way the DiT
  is evaluated at t = sigma, the time the fork trains with.
- ``tiny_krea2``: Krea 2's ``SingleStreamDiT`` (Fizgig), ComfyUI 0.28 and later only.
- ``tiny_wan``: Wan 2.1 (takenoko), the Wan kit of ``devkit.families``.

Each is made from the host's own model class with a few sizes, seeded (``families.seeded_init_``),
and loaded back through ComfyUI's detection (``families.comfy_model``), as its UNETLoader loads a file.
"""

from __future__ import annotations

import torch

from .families import comfy_model, seeded_init_
from .host import one_thread

# Anima / Cosmos-Predict2: ComfyUI's detection takes the width from the file and hard-codes the
# depth, heads, text width and AdaLN-LoRA width of the real models (fixed here)
ANIMA_WIDTH, ANIMA_TEXT_DIM = 256, 64
ANIMA_FIX = dict(num_blocks=2, num_heads=2, crossattn_emb_channels=ANIMA_TEXT_DIM, adaln_lora_dim=32)
ANIMA_SAMPLING = dict(multiplier=1.0, shift=3.0)  # comfy.supported_models.Anima.sampling_settings

# Krea 2: every size below is one ComfyUI's detection reads back from the weights (head width 128)
KREA2_SIZES = dict(features=256, heads=2, kvheads=2, layers=2, txtlayers=2, txtdim=160, channels=16, patch=2)


def has_anima() -> bool:
    import comfy.supported_models

    return hasattr(comfy.supported_models, "Anima")


def has_krea2() -> bool:
    import comfy.supported_models

    return hasattr(comfy.supported_models, "Krea2")


def _from_host_class(comfy_class: str, unet_config: dict, seed: int, detection_fix=None):
    """A seeded model of the host's ``comfy_class``, loaded back through ComfyUI's detection."""
    import comfy.supported_models

    config = getattr(comfy.supported_models, comfy_class)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    first = config.get_model({}, "")
    seeded_init_(first.diffusion_model, seed)
    sd = dict(first.diffusion_model.state_dict())
    model = comfy_model(sd, comfy_class, detection_fix)
    got = {n: tuple(t.shape) for n, t in model.model.diffusion_model.state_dict().items()}
    if got != {n: tuple(t.shape) for n, t in sd.items()}:
        raise RuntimeError(f"{comfy_class}: ComfyUI's detection sizes these weights differently")
    return model


def anima_sampling(model_patcher):
    """Anima's sampling on a Cosmos-Predict2 model, as ComfyUI's ModelSamplingSD3 node patches it:
    discrete flow (CONST) with Anima's multiplier 1.0 and shift 3.0 (a clone; the input is untouched)."""
    import comfy.model_sampling

    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    m = model_patcher.clone()
    sampling = ModelSamplingAdvanced(m.model.model_config)
    sampling.set_parameters(shift=ANIMA_SAMPLING["shift"], multiplier=ANIMA_SAMPLING["multiplier"])
    m.add_object_patch("model_sampling", sampling)
    return m


def tiny_anima(seed: int = 0):
    """The Anima DiT (ComfyUI 0.28: ``Anima``; older hosts: ``CosmosT2IPredict2`` with Anima's
    sampling) in a ModelPatcher. Its LLM adapter (fixed at the real sizes by ComfyUI) is part of the
    weights, as detection needs it, but unused: conditioning here is the DiT's cross-attention input."""
    sizes = dict(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16, patch_spatial=2,
                 patch_temporal=1, model_channels=ANIMA_WIDTH, concat_padding_mask=True, pos_emb_cls="rope3d",
                 pos_emb_learnable=True, use_adaln_lora=True, extra_per_block_abs_pos_emb=False,
                 rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_enable_fps_modulation=False,
                 **ANIMA_FIX)
    with one_thread():
        if has_anima():
            return _from_host_class("Anima", dict(sizes, image_model="anima"), seed, lambda detected: dict(ANIMA_FIX))
        model = _from_host_class("CosmosT2IPredict2", sizes, seed, lambda detected: dict(ANIMA_FIX))
    return anima_sampling(model)


def anima_conditioning(seed: int = 1, tokens: int = 7):
    gen = torch.Generator().manual_seed(seed)
    make = lambda: [[torch.randn(1, tokens, ANIMA_TEXT_DIM, generator=gen), {}]]
    return make(), make()


def tiny_krea2(seed: int = 0):
    """Krea 2's single-stream DiT (ComfyUI 0.28+: ``supported_models.Krea2``) in a ModelPatcher."""
    if not has_krea2():
        raise RuntimeError("this ComfyUI has no Krea 2 (comfy.supported_models.Krea2: ComfyUI 0.28 and later)")
    with one_thread():
        return _from_host_class("Krea2", dict(KREA2_SIZES, image_model="krea2"), seed)


def krea2_conditioning(seed: int = 1, tokens: int = 6):
    """Krea 2's context: (batch, tokens, txtlayers * txtdim), the Qwen3-VL layer stack."""
    gen = torch.Generator().manual_seed(seed)
    width = KREA2_SIZES["txtlayers"] * KREA2_SIZES["txtdim"]
    make = lambda: [[torch.randn(1, tokens, width, generator=gen), {}]]
    return make(), make()


def tiny_wan(seed: int = 0):
    """Wan 2.1 text-to-video (ComfyUI ``WanModel``), the Wan kit's model."""
    from .families import build, wan

    return build(wan.KIT, seed).model


def wan_conditioning(seed: int = 1):
    from .families import conditioning, wan

    return conditioning(wan.KIT, seed)
