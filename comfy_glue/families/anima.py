"""Anima (ComfyUI 0.28+: the Cosmos-Predict2 ``MiniTrainDIT`` plus an LLM adapter): its trainer (the
Anima kohya fork) names modules natively (``lora_unet_blocks_0_self_attn_q_proj``), which ComfyUI's key
map knows."""

from . import Family

FAMILY = Family("Anima", ("Anima",))
