"""Cosmos-Predict2 (text / image to image and video): diffusers ``CosmosTransformer3DModel`` names
on ComfyUI's ``MiniTrainDIT`` (the original layout), which ComfyUI's key map knows only natively."""

from . import Family

_ATTN = {"attn1": "self_attn", "attn2": "cross_attn"}
_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "output_proj"}
_NORM = {"norm1": "adaln_modulation_self_attn", "norm2": "adaln_modulation_cross_attn", "norm3": "adaln_modulation_mlp"}


def diffusers_map(unet_config: dict) -> dict:
    out = {
        "patch_embed.proj.weight": "x_embedder.proj.1.weight",
        "time_embed.t_embedder.linear_1.weight": "t_embedder.1.linear_1.weight",
        "time_embed.t_embedder.linear_2.weight": "t_embedder.1.linear_2.weight",
        "norm_out.linear_1.weight": "final_layer.adaln_modulation.1.weight",
        "norm_out.linear_2.weight": "final_layer.adaln_modulation.2.weight",
        "proj_out.weight": "final_layer.linear.weight",
    }
    for i in range(unet_config.get("num_blocks", 10)):
        d, c = f"transformer_blocks.{i}", f"blocks.{i}"
        for attn, comfy_attn in _ATTN.items():
            for proj, comfy_proj in _PROJ.items():
                out[f"{d}.{attn}.{proj}.weight"] = f"{c}.{comfy_attn}.{comfy_proj}.weight"
        out[f"{d}.ff.net.0.proj.weight"] = f"{c}.mlp.layer1.weight"
        out[f"{d}.ff.net.2.weight"] = f"{c}.mlp.layer2.weight"
        for norm, comfy_norm in _NORM.items():
            out[f"{d}.{norm}.linear_1.weight"] = f"{c}.{comfy_norm}.1.weight"
            out[f"{d}.{norm}.linear_2.weight"] = f"{c}.{comfy_norm}.2.weight"
    return out


FAMILY = Family("Cosmos-Predict2", ("CosmosT2IPredict2", "CosmosI2VPredict2"), diffusers_map)
