"""AuraFlow: ``AuraFlowTransformer2DModel`` through ComfyUI's own diffusers conversion
(``convert_diffusers_mmdit`` with ``auraflow_to_diffusers``) and detection.

ComfyUI's detection takes the layer counts, the text width and the position table from the file,
but not the width: ComfyUI's MMDiT hard-codes real AuraFlow's (3072 wide, 12 heads), so the tiny
model's width and head count are given to it (``detection_fix``).
"""

from __future__ import annotations

import torch

from . import Kit

CONTEXT_DIM, HEADS, HEAD_DIM = 64, 2, 128


def conditioning(kit, gen, batch: int = 1, tokens: int = 8):
    make = lambda: [[torch.randn(batch, tokens, CONTEXT_DIM, generator=gen), {}]]
    return make(), make()


KIT = Kit(
    family="auraflow",
    comfy_class="AuraFlow",
    diffusers_class="AuraFlowTransformer2DModel",
    diffusers_config=dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1,
                          num_single_dit_layers=1, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                          joint_attention_dim=CONTEXT_DIM, caption_projection_dim=HEADS * HEAD_DIM,
                          pos_embed_max_size=64),
    direction="diffusers",
    detection_fix=lambda cfg: {"dim": HEADS * HEAD_DIM, "n_heads": HEADS, "global_conddim": HEADS * HEAD_DIM},
    conditioning=conditioning,
    latent_shape=(1, 4, 8, 8),
    # SimpleTuner's generic preset wraps attention only: AuraFlow's feed-forward is its own class
    presets={"generic": ["Attention", "FeedForward"], "family": ["Attention", "AuraFlowFeedForward"]},
)
