"""A layer's base weight as the SVD must see it: unpatched, and dequantized where it is stored quantized.

ComfyUI keeps a patched layer's original weight in ``ModelPatcher.backup``; fp8 weights may carry
a scale (``get_key_weight``'s convert function); comfy-kitchen ``QuantizedTensor``s and
ComfyUI-GGUF's tensors dequantize themselves. ``kind`` names what the weight was stored as, so the
loader can say that base terms rebuilt from it are approximate.
"""

from __future__ import annotations

from typing import Optional

import torch

import comfy.utils

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def raw_weight(model_patcher, key: str):
    """``(weight, convert)``: the layer's unpatched weight and ComfyUI's function that turns it into
    the float weight (e.g. scaled fp8: ``weight * scale_weight``), or None."""
    backup = getattr(model_patcher, "backup", {}) or {}
    if key in backup:
        return backup[key].weight, None
    from comfy.model_patcher import get_key_weight

    weight, _set, convert = get_key_weight(model_patcher.model, key)
    return weight, convert


def quantized_kind(weight) -> Optional[str]:
    """What a quantized weight is stored as (its layout's name), or None for a plain tensor."""
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:  # ComfyUI before quantized tensors
        QuantizedTensor = ()
    if QuantizedTensor and isinstance(weight, QuantizedTensor):
        # comfy-kitchen's tensors (ComfyUI >= 0.28) name their layout _layout_cls, ComfyUI's own _layout_type
        layout = next((v for v in (getattr(weight, a, None) for a in ("_layout_cls", "_layout_type", "layout_type"))
                       if isinstance(v, str)), type(weight).__name__)
        return f"quantized ({layout})"
    if hasattr(weight, "tensor_type") and hasattr(weight, "tensor_shape"):  # ComfyUI-GGUF
        return f"GGUF ({weight.tensor_type})"
    if weight.dtype in FP8_DTYPES:
        return str(weight.dtype).replace("torch.", "")
    return None


def dequantized(model_patcher, key: str) -> tuple[torch.Tensor, Optional[str]]:
    """(weight as a float tensor, None | what it was quantized as). fp32/fp16/bf16 weights are
    returned as they are (the SVD reads them in fp32 chunks, like lycoris' ``weight.float()``)."""
    weight, convert = raw_weight(model_patcher, key)
    kind = quantized_kind(weight)
    if kind is not None and kind.startswith("quantized"):
        w = weight.dequantize().float()
    elif kind is not None and kind.startswith("GGUF"):
        owner = comfy.utils.get_attr(model_patcher.model, key.rsplit(".", 1)[0])
        getter = getattr(owner, "get_weight", None)
        if getter is None:
            raise ValueError(f"{key}: a GGUF-quantized weight this pack cannot dequantize")
        w = getter(weight, torch.float32).float()
    elif weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and convert is None:
        w = weight  # no full-size copy
    else:
        w = weight.float()
    if convert is not None:  # e.g. scaled fp8: weight * scale_weight
        w = convert(w.clone(), inplace=True)
        if kind is None and weight.dtype != torch.float32 and weight.dtype.itemsize < 2:
            kind = "scaled"
    return w, kind
