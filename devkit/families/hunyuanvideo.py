"""HunyuanVideo 1.5 (SimpleTuner's ``hunyuanvideo``): ``HunyuanVideo15Transformer3DModel`` and
ComfyUI's ``HunyuanVideo15`` (the HunyuanVideo model: Flux-like double blocks with fused qkv, a
token refiner with fused qkv, no single blocks).

ComfyUI has no diffusers conversion for it, so the ComfyUI model comes from the host's class.
diffusers has no single-file converter for 1.5 (its script reads Tencent's 1.5 files, whose q, k,
v are separate weights); ComfyUI's layout is the fused one of HunyuanVideo 1.0, which diffusers'
``convert_hunyuan_video_transformer_to_diffusers`` converts, blocks and token refiner included.
The way there: ComfyUI's names back to the original ones (ComfyUI's own load-time renames,
``process_unet_state_dict``, inverted and checked against it), diffusers' 1.0 converter, then
1.5's names for the parts 1.0 lacks or names otherwise (time / ByT5 / vision embeddings, as
diffusers' 1.5 conversion script names them): no preset adapts those.
The sizes keep what ComfyUI's detection hard-codes (head width 128, 2 refiner blocks, the ByT5
mapper's 1472 / 2048, the vision input 1152 that tells 1.5 from 1.0).
"""

from __future__ import annotations

import torch

from . import Kit

CONTEXT_DIM, BYT5_DIM = 64, 1472

# ComfyUI's renames of the original names, inverted; order matters (the generic mlp.0 first)
_TO_ORIGINAL = [
    ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."),
    ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.mlp.0."),
    ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.mlp.2."),
    ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
    ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
    ("time_in.in_layer.", "time_in.mlp.0."), ("time_in.out_layer.", "time_in.mlp.2."),
    ("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
    ("_attn.norm.query_norm.", "_attn_q_norm."), ("_attn.norm.key_norm.", "_attn_k_norm."),
]
# diffusers' 1.0 converter's name prefixes -> 1.5's (diffusers' convert_hunyuan_video1_5_to_diffusers.py)
_TO_15 = [
    ("time_text_embed.timestep_embedder.", "time_embed.timestep_embedder."),
    ("byt5_in.layernorm.", "context_embedder_2.norm."), ("byt5_in.net.0.proj.", "context_embedder_2.linear_1."),
    ("byt5_in.net.2.", "context_embedder_2.linear_2."), ("byt5_in.fc3.", "context_embedder_2.linear_3."),
    ("vision_in.proj.0.", "image_embedder.norm_in."), ("vision_in.proj.1.", "image_embedder.linear_1."),
    ("vision_in.proj.3.", "image_embedder.linear_2."), ("vision_in.proj.4.", "image_embedder.norm_out."),
    ("cond_type_embedding.", "cond_type_embed."),
]


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def _prefix(key: str, pairs) -> str:
    return next((new + key[len(old):] for old, new in pairs if key.startswith(old)), key)


def converter(sd: dict) -> dict:
    """ComfyUI layout -> diffusers 1.5 (see the module docstring)."""
    import comfy.supported_models
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    original = {_rename(k, _TO_ORIGINAL).replace(".scale", ".weight"): v for k, v in sd.items()}
    if set(comfy.supported_models.HunyuanVideo15({}).process_unet_state_dict(dict(original))) != set(sd):
        raise RuntimeError("HunyuanVideo 1.5: the original names do not load back to this host's layout")
    converted = convert_hunyuan_video_transformer_to_diffusers(original)
    return {_prefix(k, _TO_15): v for k, v in converted.items()}


def comfy_sizes() -> dict:
    """ComfyUI's HunyuanVideo 1.5 config as its detection derives it from a tiny file (0.28 adds
    the meanflow flag detection sets for 1.5)."""
    import dataclasses

    import comfy.ldm.hunyuan_video.model

    sizes = dict(image_model="hunyuan_video", in_channels=65, out_channels=32, patch_size=[1, 1, 1], vec_in_dim=None,
                 axes_dim=[16, 56, 56], meanflow=False, context_in_dim=CONTEXT_DIM, hidden_size=256, mlp_ratio=4.0,
                 num_heads=2, depth=1, depth_single_blocks=0, theta=256, qkv_bias=True, byt5=True,
                 guidance_embed=False, use_cond_type_embedding=True, vision_in_dim=1152)
    if "meanflow_sum" in {f.name for f in dataclasses.fields(comfy.ldm.hunyuan_video.model.HunyuanVideoParams)}:
        sizes["meanflow_sum"] = True
    return sizes


def conditioning(kit, gen, tokens: int = 8):
    # pooled_output: HunyuanVideo.encode_adm reads it (1.5 has no vector input and ignores it)
    make = lambda: [[torch.randn(1, tokens, CONTEXT_DIM, generator=gen),
                     {"pooled_output": torch.randn(1, 16, generator=gen),
                      "conditioning_byt5small": torch.randn(1, 4, BYT5_DIM, generator=gen)}]]
    return make(), make()


KIT = Kit(
    family="hunyuanvideo",
    comfy_class="HunyuanVideo15",
    diffusers_class="HunyuanVideo15Transformer3DModel",
    diffusers_config=dict(in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=128, num_layers=1,
                          num_refiner_layers=2, mlp_ratio=4.0, text_embed_dim=CONTEXT_DIM, text_embed_2_dim=BYT5_DIM,
                          image_embed_dim=1152, rope_axes_dim=(16, 56, 56)),
    direction="comfy",
    comfy_sizes=comfy_sizes,
    converter=converter,
    # decayed spectra in the time embedding, the block's modulations and the final norm would shrink
    # the gates and the adapter's effect to ~1e-4 of the output, near fp32 rounding; the ByT5 and
    # vision embedders (2048 / 1152 wide by ComfyUI's hard-coding) would only cost time (see Kit.keep_init)
    keep_init=("time_embed", "transformer_blocks.0.norm1", "norm_out", "context_embedder_2", "image_embedder"),
    conditioning=conditioning,
    # 32 latent channels; the model's other 33 inputs (image latent, mask) come from concat_cond
    latent_shape=(1, 32, 3, 4, 4),
    # diffusers' 1.5 blocks and token refiner use the generic Attention / FeedForward classes
    presets={"generic": ["Attention", "FeedForward"]},
    video=True,
)
