"""Stable Cascade stage C: diffusers ``StableCascadeUNet`` names on ComfyUI's ``StageC``.

ComfyUI's key map knows stage C only natively (``lora_prior_unet_``). Diffusers names every layer
by ComfyUI's path but the attention: ComfyUI keeps ``nn.MultiheadAttention``'s place
(``attention.attn.{to_q,to_k,to_v,out_proj}``, q / k / v split from the original fused
``in_proj`` on load), diffusers has ``attention.{to_q,to_k,to_v,to_out.0}``. The block layout
(which block of a level is a ResBlock, TimestepBlock or AttnBlock) is ``StageC``'s: its defaults
with the model config's fields.
"""

import inspect

from . import Family

_ATTN = {"to_q": "attn.to_q", "to_k": "attn.to_k", "to_v": "attn.to_v", "to_out.0": "attn.out_proj"}


def _layers(block_type: str, t_conds) -> dict:
    """diffusers -> ComfyUI path of the Linear layers of one block, relative to the block."""
    if block_type == "A":
        return {**{f"attention.{d}": f"attention.{c}" for d, c in _ATTN.items()}, "kv_mapper.1": "kv_mapper.1"}
    if block_type == "T":
        return {p: p for p in ["mapper"] + [f"mapper_{c}" for c in t_conds]}
    if block_type == "C":
        return {"channelwise.0": "channelwise.0", "channelwise.4": "channelwise.4"}
    return {}  # "F" (stage B's feed-forward) does not occur in stage C


def diffusers_map(unet_config: dict) -> dict:
    from comfy.ldm.cascade.stage_c import StageC

    cfg = {n: p.default for n, p in inspect.signature(StageC.__init__).parameters.items()}
    cfg.update(unet_config)
    levels, blocks, kinds = len(cfg["c_hidden"]), cfg["blocks"], cfg["level_config"]
    out = {f"{p}.weight": f"{p}.weight" for p in ("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper")}
    for side, counts, order in (("down_blocks", blocks[0], range(levels)),
                                ("up_blocks", blocks[1][::-1], reversed(range(levels)))):
        for index, level in enumerate(order):
            kind = kinds[level]
            for j in range(counts[level] * len(kind)):
                for d, c in _layers(kind[j % len(kind)], cfg["t_conds"]).items():
                    out[f"{side}.{index}.{j}.{d}.weight"] = f"{side}.{index}.{j}.{c}.weight"
    return out


FAMILY = Family("Stable Cascade C", ("Stable_Cascade_C",), diffusers_map)
