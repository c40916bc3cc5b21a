"""Independent references for the runtime tests: ComfyUI's own LoRA merge of a masked adapter,
the trainers' rank formula written out again, a one-evaluation sampler, random adapters placed on
real layers through ComfyUI's key map, and models with fp8 / quantized weights.

Nothing here goes through the pack's runtime (nodes.patcher / tlora_core.runtime / nodes.sampling):
the references must be able to disagree with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from devkit.host import load_comfy, pack_module

load_comfy()  # the pack's nodes import ComfyUI; these helpers are used at module level
adapter_mod = pack_module("tlora_core.adapter")
BoundAdapter = adapter_mod.BoundAdapter

# diffusers-style names (ComfyUI's key map turns them into weight keys or fused slices)
FLUX_LAYERS = [
    "transformer_blocks_0_attn_to_q", "transformer_blocks_0_attn_to_k", "transformer_blocks_0_attn_to_v",
    "transformer_blocks_0_attn_add_q_proj", "transformer_blocks_0_attn_add_v_proj",
    "transformer_blocks_0_attn_to_out_0", "transformer_blocks_0_attn_to_add_out",
    "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_context_net_2",
    "single_transformer_blocks_0_attn_to_q", "single_transformer_blocks_0_attn_to_k",
    "single_transformer_blocks_0_attn_to_v", "single_transformer_blocks_0_proj_mlp",
    "single_transformer_blocks_0_proj_out",
]
SDXL_LAYERS = [
    f"{blk}_transformer_blocks_0_{layer}"
    for blk in ("down_blocks_1_attentions_0", "mid_block_attentions_0")
    for layer in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
                  "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2")
]


@dataclass
class Placed:
    """One adapter on one layer: the pack's BoundAdapter plus the names the reference merge needs."""

    lora_name: str  # "lycoris_..." key of ComfyUI's key map
    comfy_target: object  # weight key, or (key, (dim, offset, size))
    bound: BoundAdapter


def model_keys(model_patcher) -> dict:
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model_patcher.model, {})


def place(model_patcher, layers: list[str], make_adapter, prefix: str = "lycoris_") -> list[Placed]:
    """Put ``make_adapter(lora_name, out, in, index)`` on each layer (given by diffusers-style name)."""
    keys = model_keys(model_patcher)
    sd = model_patcher.model.state_dict()
    out = []
    for i, layer in enumerate(layers):
        lora_name = prefix + layer
        target = keys[lora_name]
        key, piece = (target, None) if isinstance(target, str) else (target[0], target[1])
        weight = sd[key]
        if piece is not None:
            dim, offset, size = piece
            assert dim == 0
            weight = weight.narrow(0, offset, size)
        module = key[len("diffusion_model."):-len(".weight")]
        ad = make_adapter(lora_name, weight, i)
        out.append(Placed(lora_name, target, BoundAdapter(module, (piece[1], piece[2]) if piece else None, ad)))
    return out


def random_plain(rank: int, seed: int, scale: float = 0.5):
    def make(name, weight, i):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        o, n = weight.shape
        down = torch.randn(rank, n, generator=g) / math.sqrt(n)
        up = torch.randn(o, rank, generator=g) / math.sqrt(rank)
        # per-rank scales that vary, so a wrong mask cannot cancel out
        s = scale * (0.5 + torch.rand(rank, generator=g))
        return adapter_mod.plain(name, up, down, s)

    return make


def random_ortho(rank: int, seed: int, scale: float = 0.5):
    def make(name, weight, i):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        o, n = weight.shape
        p0, l0, q0 = torch.linalg.svd(torch.randn(o, n, generator=g) / math.sqrt(n), full_matrices=False)
        p0, l0, q0 = p0[:, :rank], l0[:rank], q0[:rank]
        # "trained" terms = base + a perturbation, as after training from the SVD init
        p = p0 + 0.3 * torch.randn(p0.shape, generator=g) / math.sqrt(rank)
        q = q0 + 0.3 * torch.randn(q0.shape, generator=g) / math.sqrt(n)
        lam = l0 * (1 + 0.5 * torch.rand(rank, generator=g))
        return adapter_mod.ortho(name, p, lam, q, p0, l0, q0, scale=scale)

    return make


# --- the references ---------------------------------------------------------------------------
def reference_rank(model_sampling, sigma: float, R: int, r_min: int = 1, alpha: float = 1.0,
                   T: int = 1000, truncate: bool = True) -> int:
    """The trainers' formula, written out from the spec (flow models: t = T * sigma)."""
    import comfy.model_sampling

    if isinstance(model_sampling, comfy.model_sampling.CONST):
        t = T * float(sigma)
    else:
        t = float(model_sampling.timestep(torch.tensor([float(sigma)]))[0])
    if truncate:
        t = float(int(t))
    u = min(max((T - t) / T, 0.0), 1.0)
    return min(R, int(math.floor(u ** alpha * (R - r_min))) + r_min)


def masked_up(adapter, active_rank: int) -> torch.Tensor:
    """``up`` with the columns of inactive ranks zeroed: a plain LoRA equal to this mask."""
    up = adapter.up.clone()
    up[:, active_rank * adapter.group:] = 0
    return up


def lora_state_dict(placed: list[Placed], rank: Optional[int]) -> dict:
    """A plain LoRA equal to the adapters with ``rank`` ranks on (all if None): alpha = its rank, scale 1."""
    sd = {}
    for p in placed:
        ad = p.bound.adapter
        k = ad.rank if rank is None else min(rank, ad.rank)
        sd[p.lora_name + ".lora_up.weight"] = masked_up(ad, k)
        sd[p.lora_name + ".lora_down.weight"] = ad.down.clone()
        sd[p.lora_name + ".alpha"] = torch.tensor(float(ad.rank * ad.group))
    return sd


def comfy_merge(model_patcher, lora_sd: dict, strength: float = 1.0):
    """What ComfyUI's LoraLoader does with a LoRA file: a clone with the weight patches added."""
    import comfy.lora

    keys = model_keys(model_patcher)
    patches = comfy.lora.load_lora(lora_sd, keys, log_missing=False)
    m = model_patcher.clone()
    loaded = m.add_patches(patches, strength)
    assert len(loaded) == len(patches) and len(patches) > 0, (len(loaded), len(patches))
    return m


def denoise_once(model_patcher, sigma: float, positive, negative, latent: torch.Tensor, cfg: float = 2.0, seed: int = 0):
    """The model's (CFG) denoised prediction at one noise level, through ComfyUI's real sampler path."""
    import comfy.sample
    import comfy.samplers

    def one_eval(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))

    sampler = comfy.samplers.KSAMPLER(one_eval)
    sigmas = torch.tensor([float(sigma), 0.0])
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(model_patcher, noise, cfg, sampler, sigmas, positive, negative, latent,
                                      disable_pbar=True, seed=seed)


def rel_err(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """|got - ref| relative to the LoRA's effect |ref - base|."""
    effect = (ref - base).norm().item()
    assert effect > 0, "the reference LoRA has no effect: the check would be vacuous"
    return (got - ref).norm().item() / effect


def hooks_left(model_patcher) -> int:
    dm = model_patcher.model.diffusion_model
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in dm.modules())


def no_gc_collect():
    """lycoris-lora calls gc.collect() after every module's SVD init (pure clean-up, no effect on
    the numbers); in a process holding ComfyUI that costs seconds per module."""
    import contextlib
    import gc

    @contextlib.contextmanager
    def ctx():
        orig = gc.collect
        gc.collect = lambda *a, **k: 0
        try:
            yield
        finally:
            gc.collect = orig

    return ctx()


def fp8_flux():
    """The tiny Flux with its weights stored in fp8 and computed in fp32 (manual cast), as ComfyUI
    loads an fp8 file, plus the same model with those weights dequantized to fp32 (the reference)."""
    from devkit.families import comfy_model, flux
    from devkit.tiny_models import tiny_flux

    sd = tiny_flux(seed=0).model.diffusion_model.state_dict()
    q = comfy_model(sd, "Flux", flux.KIT.detection_fix, dtype=torch.float8_e4m3fn, manual_cast=torch.float32)
    d = comfy_model({k: v.float() for k, v in q.model.diffusion_model.state_dict().items()}, "Flux",
                    flux.KIT.detection_fix)
    return q, d


class QuantLinear(torch.nn.Module):
    """A GGUF-like layer: int8 weight + per-row scale, dequantized inside forward (no float weight)."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def dequantized(self):
        return self.qweight.float() * self.scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantized().to(x.dtype), self.bias)
