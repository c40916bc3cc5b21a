"""Lumina Image 2.0: diffusers ``Lumina2Transformer2DModel`` names on ComfyUI's ``NextDiT`` (model
config ``Lumina2``).

ComfyUI's key map gives every Lumina2-based model Z-Image's diffusers names (``attention.to_q``,
``feed_forward.w1``, k / v slices of a width as wide as q), which no Lumina 2 file uses: its
diffusers names are ``attn.to_q`` / ``to_k`` / ``to_v`` (slices of the fused ``attention.qkv``,
k and v as wide as the grouped kv heads), ``attn.to_out.0`` and ``feed_forward.linear_1/2/3``
(diffusers' converter: w1 -> linear_1, w2 -> linear_2, w3 -> linear_3).
"""

from . import Family


def diffusers_map(unet_config: dict) -> dict:
    dim = unet_config.get("dim", 4096)
    heads = unet_config.get("n_heads", 32)
    kv = (unet_config.get("n_kv_heads") or heads) * (dim // heads)
    refiners = unet_config.get("n_refiner_layers", 2)
    blocks = ([(f"layers.{i}", True) for i in range(unet_config.get("n_layers", 0))]
              + [(f"noise_refiner.{i}", True) for i in range(refiners)]
              + [(f"context_refiner.{i}", False) for i in range(refiners)])
    out = {
        "x_embedder.weight": "x_embedder.weight",
        "time_caption_embed.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
        "time_caption_embed.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
        "time_caption_embed.caption_embedder.1.weight": "cap_embedder.1.weight",
        "norm_out.linear_1.weight": "final_layer.adaLN_modulation.1.weight",
        "norm_out.linear_2.weight": "final_layer.linear.weight",
    }
    for b, modulated in blocks:
        qkv = f"{b}.attention.qkv.weight"
        out[f"{b}.attn.to_q.weight"] = (qkv, (0, 0, dim))
        out[f"{b}.attn.to_k.weight"] = (qkv, (0, dim, kv))
        out[f"{b}.attn.to_v.weight"] = (qkv, (0, dim + kv, kv))
        out[f"{b}.attn.to_out.0.weight"] = f"{b}.attention.out.weight"
        for n in (1, 2, 3):
            out[f"{b}.feed_forward.linear_{n}.weight"] = f"{b}.feed_forward.w{n}.weight"
        if modulated:
            out[f"{b}.norm1.linear.weight"] = f"{b}.adaLN_modulation.1.weight"
    return out


FAMILY = Family("Lumina 2", ("Lumina2",), diffusers_map)
