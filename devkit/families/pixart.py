"""PixArt Sigma (SimpleTuner's ``pixart_sigma``): ``PixArtTransformer2DModel`` and ComfyUI's ``PixArtMS``.

ComfyUI loads diffusers PixArt files itself, but its conversion (``convert_diffusers_mmdit``) cuts
the fused q/k/v at real PixArt's width (1152, what its detection also hard-codes), and at that
width lycoris-lora's fp32 SVD of the base weights defines the reference deltas only to about the
test's tolerance. So the ComfyUI model comes from the host's class at a tiny width (given to
detection by ``detection_fix``), and the diffusers model from it by ComfyUI's own table read backwards
(``comfy.utils.pixart_to_diffusers`` with the model's width; diffusers ships no PixArt converter).
``y_embedder.y_embedding`` (training's caption dropout; diffusers has no such weight) keeps the
ComfyUI layout's values (``comfy_only``).
PixArt is a discrete (eps) model: the noise levels are those of DDPM timesteps, and SimpleTuner's
mask timestep is the scheduler's integer timestep.
"""

from __future__ import annotations

import torch

from . import Kit

WIDTH, HEADS, CAPTION_DIM, DEPTH = 256, 4, 64, 1


def _to_diffusers(sd: dict) -> dict:
    import comfy.utils

    table = comfy.utils.pixart_to_diffusers({"depth": DEPTH, "hidden_size": WIDTH})
    out = {}
    for dkey, target in table.items():
        key, piece = (target, None) if isinstance(target, str) else target[:2]
        if key in sd and dkey != "caption_projection.y_embedding":
            out[dkey] = sd[key] if piece is None else sd[key].narrow(*piece)
    return out


def conditioning(kit, gen, batch: int = 1, tokens: int = 8):
    make = lambda: [[torch.randn(batch, tokens, CAPTION_DIM, generator=gen), {}]]
    return make(), make()


def sigmas(model):
    ms = model.model.model_sampling
    return [float(ms.sigma(torch.tensor(float(t)))) for t in (999, 800, 600, 400, 200, 20)]


def simpletuner_t(model_sampling, sigma):
    # SimpleTuner's pipeline masks with int(t), t the scheduler's timestep of the step: the DDPM
    # timestep whose noise level ComfyUI samples at
    return float(model_sampling.timestep(torch.tensor(float(sigma))))


KIT = Kit(
    family="pixart",
    comfy_class="PixArtSigma",
    diffusers_class="PixArtTransformer2DModel",
    diffusers_config=dict(num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, in_channels=4, out_channels=8,
                          num_layers=DEPTH, cross_attention_dim=WIDTH, caption_channels=CAPTION_DIM, sample_size=8,
                          patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False),
    direction="comfy",
    comfy_sizes=dict(image_model="pixart_sigma", micro_condition=False, hidden_size=WIDTH, num_heads=HEADS,
                     depth=DEPTH, caption_channels=CAPTION_DIM),
    comfy_only=("y_embedder.y_embedding",),
    detection_fix=lambda cfg: {"hidden_size": WIDTH, "num_heads": HEADS, "caption_channels": CAPTION_DIM},
    converter=_to_diffusers,
    conditioning=conditioning,
    # PixArtMS derives its position table's scale from the mean side: 0 (a division by zero) below 33
    latent_shape=(1, 4, 8, 64),
    presets={"generic": ["Attention", "FeedForward"]},
    sigmas=sigmas,
    simpletuner_t=simpletuner_t,
)
