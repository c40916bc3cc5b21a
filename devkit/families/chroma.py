"""Chroma: ``ChromaTransformer2DModel`` and ComfyUI's ``Chroma`` (Flux.1's blocks without their own
modulation, fed by the distilled guidance approximator).

ComfyUI does not load Chroma's diffusers files (its diffusers conversion reads them as Flux.1 and
drops the approximator), so the ComfyUI model comes from the host's class and diffusers' own
``convert_chroma_transformer_checkpoint_to_diffusers`` makes the diffusers model of it. Both sides
hard-code real Chroma's widths: ComfyUI's detection the head count (0.3.75: 24), the
approximator (5 layers of 5120) and its output (3072 = the hidden width), diffusers' converter
the hidden width that splits the single blocks' ``linear1`` (``inner_dim = 3072``). The tiny
model replaces those constants by its own widths and nothing else (``with_split_sizes``).
"""

from __future__ import annotations

import re

import torch

from . import Kit, with_split_sizes

CONTEXT_DIM, APPROX_DIM, APPROX_LAYERS, HIDDEN = 64, 128, 2, 256


def conditioning(kit, gen, tokens: int = 8):
    # pooled_output: 0.3.75's Flux.encode_adm reads it (Chroma has no vector input)
    make = lambda: [[torch.randn(1, tokens, CONTEXT_DIM, generator=gen),
                     {"pooled_output": torch.randn(1, 16, generator=gen)}]]
    return make(), make()


def comfy_sizes() -> dict:
    """ComfyUI's Chroma config as its detection derives it from a tiny file (0.28's Chroma also
    takes the text position axes and the vector width)."""
    import dataclasses

    import comfy.ldm.chroma.model

    sizes = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=CONTEXT_DIM, hidden_size=HIDDEN,
                 mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                 patch_size=2, qkv_bias=True, in_dim=64, out_dim=HIDDEN, hidden_dim=APPROX_DIM, n_layers=APPROX_LAYERS)
    fields = {f.name for f in dataclasses.fields(comfy.ldm.chroma.model.ChromaParams)}
    sizes.update({k: v for k, v in dict(txt_ids_dims=[], vec_in_dim=None).items() if k in fields})
    return sizes


def _diffusers_converter():
    """diffusers' Chroma converter, whose single-block split hard-codes real Chroma's width (3072,
    MLP 4 x 3072), at the tiny width."""
    from diffusers.loaders import single_file_utils

    h = HIDDEN
    return with_split_sizes(single_file_utils.convert_chroma_transformer_checkpoint_to_diffusers,
                            {(3072, 3072, 3072, 12288): (h, h, h, 4 * h)})


_NORM = re.compile(r"(query_norm|key_norm|distilled_guidance_layer\.norms\.\d+)\.weight$")


def converter(sd: dict) -> dict:
    """ComfyUI layout -> diffusers: the RMSNorm scales 0.28 renames ``.weight`` (its Chroma
    ``process_unet_state_dict``) named ``.scale`` again, as in Chroma's files, then diffusers'."""
    import comfy.supported_models

    original = {_NORM.sub(r"\1.scale", k): v for k, v in sd.items()}
    if set(comfy.supported_models.Chroma({}).process_unet_state_dict(dict(original))) != set(sd):
        raise RuntimeError("Chroma: the file names do not load back to this host's layout")
    return _diffusers_converter()(original)


KIT = Kit(
    family="chroma",
    comfy_class="Chroma",
    diffusers_class="ChromaTransformer2DModel",
    diffusers_config=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                          num_attention_heads=2, joint_attention_dim=CONTEXT_DIM, axes_dims_rope=(16, 56, 56),
                          approximator_num_channels=64, approximator_hidden_dim=APPROX_DIM,
                          approximator_layers=APPROX_LAYERS),
    direction="comfy",
    comfy_sizes=comfy_sizes,
    converter=converter,
    detection_fix=lambda cfg: {"num_heads": cfg["hidden_size"] // 128, "out_dim": cfg["hidden_size"],
                               "hidden_dim": APPROX_DIM, "n_layers": APPROX_LAYERS},
    # decayed spectra in the approximator would shrink every modulation and the adapter's effect
    # to ~3e-4 of the output, near fp32 rounding (see Kit.keep_init)
    keep_init=("distilled_guidance_layer",),
    conditioning=conditioning,
    latent_shape=(1, 16, 8, 8),
    # SimpleTuner's Chroma attention is diffusers' FluxAttention: the generic preset wraps only the
    # feed-forwards
    presets={"generic": ["Attention", "FeedForward"], "family": ["FluxAttention", "FeedForward"]},
)
