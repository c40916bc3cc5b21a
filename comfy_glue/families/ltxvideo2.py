"""LTX-2 (audio-video): diffusers ``LTX2VideoTransformer3DModel`` names on ComfyUI's ``LTXAVModel``.

The blocks have the same paths in both (``transformer_blocks.N.audio_to_video_attn.to_q``,
``audio_ff.net.2``), but ComfyUI's key map knows them only bare, not in the ``lycoris_`` /
``transformer.`` forms SimpleTuner and diffusers trainers write; the embeddings differ by name
as diffusers' ``convert_ltx2_transformer_to_diffusers`` renames them. ``LTXAV`` is a subclass of
``LTXV``'s config: listing it here makes this map win for LTX-2 models.
"""

from . import Family, renames

_ADALN = {
    "time_embed": "adaln_single",
    "audio_time_embed": "audio_adaln_single",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
    # LTX-2.3's prompt modulation (diffusers' converter leaves these two unrenamed)
    "prompt_adaln": "prompt_adaln_single",
    "audio_prompt_adaln": "audio_prompt_adaln_single",
}
_OUTER = {"proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj", "proj_out": "proj_out",
          "audio_proj_out": "audio_proj_out"}
for _d, _c in _ADALN.items():
    for _lin in ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear"):
        _OUTER[f"{_d}.{_lin}"] = f"{_c}.{_lin}"
for _cap in ("caption_projection", "audio_caption_projection"):
    for _lin in ("linear_1", "linear_2"):
        _OUTER[f"{_cap}.{_lin}"] = f"{_cap}.{_lin}"

_ATTN = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
# to_gate_logits: LTX-2.3's per-head attention gates (a Linear inside LTX2Attention, so the family preset wraps it)
_BLOCK = [f"{attn}.{proj}" for attn in _ATTN for proj in ("to_q", "to_k", "to_v", "to_out.0", "to_gate_logits")]
_BLOCK += [f"{ff}.{lin}" for ff in ("ff", "audio_ff") for lin in ("net.0.proj", "net.2")]


def diffusers_map(unet_config: dict) -> dict:
    return renames(_OUTER, {p: p for p in _BLOCK}, unet_config.get("num_layers", 0), "transformer_blocks.{}",
                   "transformer_blocks.{}")


FAMILY = Family("LTX-2", ("LTXAV",), diffusers_map)
