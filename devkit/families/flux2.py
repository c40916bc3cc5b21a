"""Flux.2 (Klein): ``Flux2Transformer2DModel`` and ComfyUI's ``Flux2`` (the Flux model class with
global modulation, SiLU-gated MLPs and fused single blocks).

ComfyUI does not load Flux.2's diffusers files (its diffusers conversion reads a Flux.1 file:
``x_embedder.bias``, which Flux.2 has not), so the ComfyUI model comes from the host's class and
diffusers' own single-file converter makes the diffusers model of it. The sizes keep what
ComfyUI's detection hard-codes (head width 128 = the four rotary axes of 32, MLP ratio 3, 128
latent channels); 0.3.75's detection also fixes the head count at 48 (Flux.2 dev's), which the
tiny model's two heads replace.
"""

from __future__ import annotations

import torch

from . import Kit

CONTEXT_DIM = 64


def conditioning(kit, gen, tokens: int = 8):
    # pooled_output: 0.3.75's Flux.encode_adm reads it (Flux.2 has no vector input and ignores it)
    make = lambda: [[torch.randn(1, tokens, CONTEXT_DIM, generator=gen),
                     {"pooled_output": torch.randn(1, 16, generator=gen)}]]
    return make(), make()


def comfy_sizes() -> dict:
    """ComfyUI's Flux.2 config as its detection derives it from a tiny file (0.28's Flux model
    also takes the text position axes)."""
    import dataclasses

    import comfy.ldm.flux.model

    sizes = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=CONTEXT_DIM,
                 hidden_size=256, mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1,
                 axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                 global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                 ref_index_scale=10.0)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        sizes["txt_ids_dims"] = [3]
    return sizes


KIT = Kit(
    family="flux2",
    comfy_class="Flux2",
    diffusers_class="Flux2Transformer2DModel",
    diffusers_config=dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
                          num_attention_heads=2, joint_attention_dim=CONTEXT_DIM, mlp_ratio=3.0,
                          axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
    direction="comfy",
    comfy_sizes=comfy_sizes,
    converter="convert_flux2_transformer_checkpoint_to_diffusers",
    detection_fix=lambda cfg: {"num_heads": cfg["hidden_size"] // 128},
    # no biases anywhere: decayed spectra in the time embedding and the shared modulations would
    # shrink every gate to ~1e-3 and the adapter's effect below fp32 rounding (see Kit.keep_init)
    keep_init=("time_guidance_embed", "double_stream_modulation", "single_stream_modulation", "norm_out"),
    conditioning=conditioning,
    latent_shape=(1, 128, 4, 4),
    # the generic classes wrap nothing in Flux.2 (SimpleTuner's documentation: use the Flux2 classes)
    presets={"family": ["Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"]},
)
