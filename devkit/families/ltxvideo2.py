"""LTX-2 audio-video: ``LTX2VideoTransformer3DModel`` and ComfyUI's ``LTXAVModel`` (ComfyUI 0.28 on).

ComfyUI does not load diffusers-format LTX-2 files itself, so the ComfyUI model comes from the
host's class and diffusers' own converter makes the diffusers model of it. Real LTX-2 files carry
their transformer sizes in the file's metadata; from the weights alone ComfyUI's detection derives
only the depth, the cross-attention width and the head width at 32 heads, so the tiny model's heads,
audio sizes, caption width and connectors come as the detection fix. The two text-embedding
connectors belong to the diffusion model in ComfyUI but are a model of their own in diffusers
(the converter drops them): they keep their ComfyUI weights, and are not run here, as the
conditioning is the fully processed context (video and audio features side by side, as ComfyUI's
LTX-2 text encoder gives it in compat mode).

The latent is video and audio together, in the packed form ComfyUI's sampler gives the model
(``comfy.utils.pack_latents`` of a nested latent, with the ``latent_shapes`` the model unpacks
by), so that the audio branch, both cross-modal attentions and ``audio_ff`` run. The attentions
have LTX-2.3's per-head gates (``to_gate_logits``, which the family preset wraps too); the rest
is LTX-2.0 (LTX-2.3's prompt modulation, ``prompt_adaln_single``, diffusers' converter does not
rename to its ``prompt_adaln``).
"""

from __future__ import annotations

import math

import torch

from . import Kit

_VIDEO = (1, 128, 3, 4, 4)  # 128 latent channels; 3 frames of 4 x 4
_AUDIO = (1, 8, 5, 16)  # ComfyUI's audio latent: 8 channels x 16 frequency bins (its audio_in_channels 128), 5 steps
_CAPTION = 64

# over the detected config (depth, cross-attention width): what ComfyUI would read from a real file's metadata
_SIZES = dict(num_attention_heads=2, attention_head_dim=64, audio_num_attention_heads=2, audio_attention_head_dim=32,
              audio_cross_attention_dim=64, caption_channels=_CAPTION,
              connector_num_layers=1, connector_num_attention_heads=2, connector_attention_head_dim=32,
              apply_gated_attention=True)


def _conditioning(kit, gen):
    shapes = [torch.Size(_VIDEO), torch.Size(_AUDIO)]
    make = lambda: [[torch.randn(1, 7, 2 * _CAPTION, generator=gen), {"latent_shapes": shapes}]]
    return make(), make()


KIT = Kit(
    family="ltxvideo2",
    comfy_class="LTXAV",
    diffusers_class="LTX2VideoTransformer3DModel",
    diffusers_config=dict(in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=64,
                          cross_attention_dim=128, audio_in_channels=128, audio_out_channels=128,
                          audio_num_attention_heads=2, audio_attention_head_dim=32, audio_cross_attention_dim=64,
                          num_layers=2, caption_channels=_CAPTION, gated_attn=True, audio_gated_attn=True),
    direction="comfy",
    comfy_sizes=dict(image_model="ltxav", num_layers=2, cross_attention_dim=128, **_SIZES),
    detection_fix=lambda detected: dict(_SIZES),
    comfy_only=("video_embeddings_connector.", "audio_embeddings_connector."),
    converter="convert_ltx2_transformer_to_diffusers",
    conditioning=_conditioning,
    latent_shape=(1, 1, math.prod(_VIDEO) + math.prod(_AUDIO)),
    presets={"generic": ["Attention", "FeedForward"], "family": ["LTX2Attention", "FeedForward"]},
    min_host=(0, 28, 0),
    video=True,
)
