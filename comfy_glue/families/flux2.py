"""Flux.2 (Klein, dev): diffusers ``Flux2Transformer2DModel`` names on ComfyUI's Flux model.

ComfyUI's Flux key map gives the double blocks' attention names (shared with Flux.1: ``to_q`` a
slice of ``img_attn.qkv``, ``to_out.0`` = ``img_attn.proj``), but on 0.3.75 not Flux.2's own:
the SiLU-gated MLPs (``ff.linear_in`` / ``linear_out``) and the fused single blocks, whose
``attn.to_qkv_mlp_proj`` is the whole ``linear1`` (q | k | v | gate | up) and ``attn.to_out`` the
whole ``linear2``, as diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers`` maps them;
nor Flux.2's time embedding and shared modulations.
ComfyUI 0.28 knows these names too; its own map wins there (the same targets).
"""

from . import Family

_MLP = {"ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
# Flux.2's own time embedding and shared modulations (no preset adapts them)
_OUTER = {
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}


def diffusers_map(unet_config: dict) -> dict:
    out = {f"{d}.weight": f"{c}.weight" for d, c in _OUTER.items()}
    for i in range(unet_config.get("depth", 0)):
        for d, c in _MLP.items():
            out[f"transformer_blocks.{i}.{d}.weight"] = f"double_blocks.{i}.{c}.weight"
    for i in range(unet_config.get("depth_single_blocks", 0)):
        for d, c in _SINGLE.items():
            out[f"single_transformer_blocks.{i}.{d}.weight"] = f"single_blocks.{i}.{c}.weight"
    return out


FAMILY = Family("Flux.2", ("Flux2",), diffusers_map)
