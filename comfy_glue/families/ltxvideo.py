"""LTX-Video 0.9.x: diffusers ``LTXVideoTransformer3DModel`` names on ComfyUI's ``LTXVModel``.

The blocks have the same paths in both (``transformer_blocks.N.attn1.to_q``, ``ff.net.0.proj``),
but ComfyUI's key map knows them only bare (``lora_unet_`` / the plain path), not in the
``lycoris_`` / ``transformer.`` forms SimpleTuner and diffusers trainers write; the embeddings
differ by name (``proj_in`` is ``patchify_proj``, ``time_embed`` is ``adaln_single``), as
diffusers' ``convert_ltx_transformer_checkpoint_to_diffusers`` renames them.
"""

from . import Family, renames

_OUTER = {
    "proj_in": "patchify_proj",
    "time_embed.emb.timestep_embedder.linear_1": "adaln_single.emb.timestep_embedder.linear_1",
    "time_embed.emb.timestep_embedder.linear_2": "adaln_single.emb.timestep_embedder.linear_2",
    "time_embed.linear": "adaln_single.linear",
    "caption_projection.linear_1": "caption_projection.linear_1",
    "caption_projection.linear_2": "caption_projection.linear_2",
    "proj_out": "proj_out",
}
_BLOCK = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
_BLOCK += ["ff.net.0.proj", "ff.net.2"]


def diffusers_map(unet_config: dict) -> dict:
    return renames(_OUTER, {p: p for p in _BLOCK}, unet_config.get("num_layers", 0), "transformer_blocks.{}",
                   "transformer_blocks.{}")


FAMILY = Family("LTX-Video", ("LTXV",), diffusers_map)
