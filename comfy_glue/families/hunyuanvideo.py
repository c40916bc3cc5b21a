"""HunyuanVideo 1.5 (SimpleTuner's ``hunyuanvideo``): diffusers ``HunyuanVideo15Transformer3DModel``
names on ComfyUI's HunyuanVideo model.

ComfyUI's key map knows this model only by its own and diffusion-pipe's names
(``transformer.double_blocks.0.img_attn_qkv``); diffusers' layout splits what ComfyUI fuses:
``attn.to_q`` / ``to_k`` / ``to_v`` are the thirds of ``img_attn.qkv`` (``add_*_proj`` of
``txt_attn.qkv``), in the token refiner of ``self_attn.qkv``, as diffusers'
``convert_hunyuan_video_transformer_to_diffusers`` splits them (1.5's blocks are 1.0's, without
single blocks). The embeddings are renamed as diffusers' 1.5 conversion names them; the final
norm (stored with its halves swapped) has no plain target and is left out.
"""

from . import Family

_REFINER_BLOCKS = 2  # ComfyUI's TokenRefiner always has two

_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
           "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
           "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
_REFINER = {"attn.to_out.0": "self_attn.proj", "ff.net.0.proj": "mlp.0", "ff.net.2": "mlp.2",
            "norm_out.linear": "adaLN_modulation.1"}
_OUTER = {
    "time_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.in_layer",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.out_layer",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.in_layer",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.out_layer",
    "context_embedder_2.linear_1": "byt5_in.fc1",
    "context_embedder_2.linear_2": "byt5_in.fc2",
    "context_embedder_2.linear_3": "byt5_in.fc3",
    "image_embedder.linear_1": "vision_in.proj.1",
    "image_embedder.linear_2": "vision_in.proj.3",
    "proj_out": "final_layer.linear",
}


def _thirds(names, fused: str, h: int) -> dict:
    return {n: (fused, (0, i * h, h)) for i, n in enumerate(names)}


def diffusers_map(unet_config: dict) -> dict:
    h = unet_config.get("hidden_size", 0)
    out = {f"{d}.weight": f"{c}.weight" for d, c in _OUTER.items()}
    for i in range(unet_config.get("depth", 0)):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for names, fused in (((("attn.to_q", "attn.to_k", "attn.to_v")), "img_attn.qkv"),
                             (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv")):
            for n, target in _thirds(names, f"{dst}{fused}.weight", h).items():
                out[f"{src}{n}.weight"] = target
        out.update({f"{src}{d}.weight": f"{dst}{c}.weight" for d, c in _DOUBLE.items()})
    for j in range(_REFINER_BLOCKS):
        src = f"context_embedder.token_refiner.refiner_blocks.{j}."
        dst = f"txt_in.individual_token_refiner.blocks.{j}."
        for n, target in _thirds(("attn.to_q", "attn.to_k", "attn.to_v"), f"{dst}self_attn.qkv.weight", h).items():
            out[f"{src}{n}.weight"] = target
        out.update({f"{src}{d}.weight": f"{dst}{c}.weight" for d, c in _REFINER.items()})
    return out


FAMILY = Family("HunyuanVideo 1.5", ("HunyuanVideo15",), diffusers_map)
