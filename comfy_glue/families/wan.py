"""Wan 2.1 / 2.2 (text/image to video): diffusers ``WanTransformer3DModel`` names on ComfyUI's
``WanModel`` (the original Wan layout), which ComfyUI's key map knows only natively."""

from . import Family, crossed, renames

_ATTN = {"attn1": "self_attn", "attn2": "cross_attn"}
_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}


_OUTER = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}
_BLOCK = crossed(_ATTN, _PROJ)
_BLOCK.update({"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"})


def diffusers_map(unet_config: dict) -> dict:
    return renames(_OUTER, _BLOCK, unet_config.get("num_layers", 0), "blocks.{}", "blocks.{}")


FAMILY = Family("Wan 2.x", ("WAN21_T2V",), diffusers_map)
