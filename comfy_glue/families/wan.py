"""Wan 2.1 / 2.2 (text/image to video): diffusers ``WanTransformer3DModel`` names on ComfyUI's
``WanModel`` (the original Wan layout), which ComfyUI's key map knows only natively."""

from . import Family

_ATTN = {"attn1": "self_attn", "attn2": "cross_attn"}
_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}


def diffusers_map(unet_config: dict) -> dict:
    out = {
        "condition_embedder.time_embedder.linear_1.weight": "time_embedding.0.weight",
        "condition_embedder.time_embedder.linear_2.weight": "time_embedding.2.weight",
        "condition_embedder.time_proj.weight": "time_projection.1.weight",
        "condition_embedder.text_embedder.linear_1.weight": "text_embedding.0.weight",
        "condition_embedder.text_embedder.linear_2.weight": "text_embedding.2.weight",
        "condition_embedder.image_embedder.ff.net.0.proj.weight": "img_emb.proj.1.weight",
        "condition_embedder.image_embedder.ff.net.2.weight": "img_emb.proj.3.weight",
        "proj_out.weight": "head.head.weight",
    }
    for i in range(unet_config.get("num_layers", 0)):
        for attn, comfy_attn in _ATTN.items():
            for proj, comfy_proj in _PROJ.items():
                out[f"blocks.{i}.{attn}.{proj}.weight"] = f"blocks.{i}.{comfy_attn}.{comfy_proj}.weight"
        out[f"blocks.{i}.ffn.net.0.proj.weight"] = f"blocks.{i}.ffn.0.weight"
        out[f"blocks.{i}.ffn.net.2.weight"] = f"blocks.{i}.ffn.2.weight"
    return out


FAMILY = Family("Wan 2.x", ("WAN21_T2V",), diffusers_map)
