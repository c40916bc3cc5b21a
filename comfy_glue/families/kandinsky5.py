"""Kandinsky 5 (video and image; ComfyUI 0.28 on): ComfyUI's layout is diffusers'
``Kandinsky5Transformer3DModel``, but its key map knows only the bare and ``transformer.`` names:
the map gives every weight its own name, for the ``lycoris_`` (and OneTrainer) forms."""

from . import Family

_ATTN = ("to_query", "to_key", "to_value", "out_layer")


def diffusers_map(unet_config: dict) -> dict:
    names = ["time_embeddings.in_layer", "time_embeddings.out_layer", "text_embeddings.in_layer",
             "pooled_text_embeddings.in_layer", "visual_embeddings.in_layer", "out_layer.modulation.out_layer",
             "out_layer.out_layer"]
    for prefix, count, modulation, attentions in (
            ("text_transformer_blocks", unet_config.get("num_text_blocks", 2), "text_modulation", ("self_attention",)),
            ("visual_transformer_blocks", unet_config.get("num_visual_blocks", 32), "visual_modulation",
             ("self_attention", "cross_attention"))):
        for i in range(count):
            b = f"{prefix}.{i}"
            names += [f"{b}.{modulation}.out_layer", f"{b}.feed_forward.in_layer", f"{b}.feed_forward.out_layer"]
            names += [f"{b}.{attn}.{proj}" for attn in attentions for proj in _ATTN]
    return {f"{n}.weight": f"{n}.weight" for n in names}


FAMILY = Family("Kandinsky 5", ("Kandinsky5", "Kandinsky5Image"), diffusers_map)
