"""Cosmos-Predict2 (text / image to image and video): diffusers ``CosmosTransformer3DModel`` names
on ComfyUI's ``MiniTrainDIT`` (the original layout), which ComfyUI's key map knows only natively."""

from . import Family, crossed, renames

_ATTN = {"attn1": "self_attn", "attn2": "cross_attn"}
_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "output_proj"}
_NORM = {"norm1": "adaln_modulation_self_attn", "norm2": "adaln_modulation_cross_attn", "norm3": "adaln_modulation_mlp"}


_OUTER = {
    "patch_embed.proj": "x_embedder.proj.1",
    "time_embed.t_embedder.linear_1": "t_embedder.1.linear_1",
    "time_embed.t_embedder.linear_2": "t_embedder.1.linear_2",
    "norm_out.linear_1": "final_layer.adaln_modulation.1",
    "norm_out.linear_2": "final_layer.adaln_modulation.2",
    "proj_out": "final_layer.linear",
}
_BLOCK = crossed(_ATTN, _PROJ)
_BLOCK.update({"ff.net.0.proj": "mlp.layer1", "ff.net.2": "mlp.layer2"})
_BLOCK.update({f"{norm}.linear_{i}": f"{comfy_norm}.{i}" for norm, comfy_norm in _NORM.items() for i in (1, 2)})


def diffusers_map(unet_config: dict) -> dict:
    return renames(_OUTER, _BLOCK, unet_config.get("num_blocks", 10), "transformer_blocks.{}", "blocks.{}")


FAMILY = Family("Cosmos-Predict2", ("CosmosT2IPredict2", "CosmosI2VPredict2"), diffusers_map)
