"""ComfyUI glue (thin): place a ``TLoRAFile``'s modules on a ComfyUI model's layers.

- Names are mapped with ComfyUI's own LoRA key map, ``comfy.lora.model_lora_keys_unet(model, {})``
  (a fresh dict every time), which knows ``lycoris_*``, ``lora_unet_*``, diffusers, processor and
  ComfyUI-native names, fused slices ``(key, (dim, offset, size))`` and function targets
  ``(key, offset, fn)``; the readers' ``lookup`` lists add PEFT-style fallbacks.
- LyCORIS modules get their base terms from the SVD of the mapped base weight (of the slice, for
  a fused qkv / linear1 target), dequantized, computed on the model's load device, one layer at a
  time with a progress bar, and cached on disk keyed by the exact weight bytes, so a reload needs
  no SVD.
- Everything is validated before anything is patched; nothing on the model is modified here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

try:  # ~10x faster than sha1 for the weight bytes (a cache key, not a security boundary)
    import xxhash
except ImportError:  # installed without requirements.txt: sha1, slower but the same behaviour
    xxhash = None

import comfy.lora
import comfy.utils

from ..tlora_core import svd
from ..tlora_core.adapter import BoundAdapter, LowRankAdapter
from ..tlora_core.formats import SvdBaseTerms, TLoRAFile, TLoRAFormatError, write_self_contained

log = logging.getLogger("comfyui_tlora")

CACHE_VERSION = "2"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


@dataclass
class BoundTLoRA:
    """The file's modules placed on the model: what the runtime attaches."""

    targets: list  # list[BoundAdapter]
    matched: list  # file module names placed on the model
    unmatched: list  # file module names with no layer in this model
    notes: list = field(default_factory=list)
    tfile: Optional[TLoRAFile] = None
    # LyCORIS: file module name -> svd.BaseTerms rebuilt from this model (see save_self_contained)
    base_terms: dict = field(default_factory=dict)
    # what the base weights the SVD read were quantized as (empty: the model's own float weights)
    quantized: list = field(default_factory=list)


@dataclass
class _Target:
    key: str  # ComfyUI state-dict key of the weight
    piece: Optional[tuple]  # (dim, offset, size) of a fused layer
    fn: Optional[object]  # ComfyUI's function target: maps the file's delta to the model's layout


def _parse_target(value) -> _Target:
    if isinstance(value, str):
        return _Target(value, None, None)
    if len(value) == 2:
        return _Target(value[0], value[1], None)
    return _Target(value[0], value[1], value[2])


def _family(model_patcher) -> str:
    return type(model_patcher.model).__name__


def _raw_weight(model_patcher, key: str):
    """The layer's unpatched weight (ComfyUI keeps the original in ``backup`` while patched)."""
    backup = getattr(model_patcher, "backup", {}) or {}
    if key in backup:
        return backup[key].weight, None
    from comfy.model_patcher import get_key_weight

    weight, _set, convert = get_key_weight(model_patcher.model, key)
    return weight, convert


def _dequantized(model_patcher, key: str) -> tuple[torch.Tensor, Optional[str]]:
    """(weight as a float tensor, None | what it was quantized as). fp32/fp16/bf16 weights are
    returned as they are (read in fp32 chunks later, like lycoris' ``weight.float()``)."""
    weight, convert = _raw_weight(model_patcher, key)
    kind = None
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:  # older ComfyUI
        QuantizedTensor = ()
    if QuantizedTensor and isinstance(weight, QuantizedTensor):
        kind = f"quantized ({getattr(weight, '_layout_type', 'QuantizedTensor')})"
        w = weight.dequantize().float()
    elif hasattr(weight, "tensor_type") and hasattr(weight, "tensor_shape"):  # ComfyUI-GGUF
        owner = comfy.utils.get_attr(model_patcher.model, key.rsplit(".", 1)[0])
        getter = getattr(owner, "get_weight", None)
        if getter is None:
            raise ValueError(f"{key}: a GGUF-quantized weight this pack cannot dequantize")
        w = getter(weight, torch.float32).float()
        kind = f"GGUF ({weight.tensor_type})"
    elif weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and convert is None:
        w = weight  # the SVD reads it in fp32 chunks: no full-size copy
    else:
        if weight.dtype in FP8_DTYPES:
            kind = str(weight.dtype).replace("torch.", "")
        w = weight.float()
    if convert is not None:  # e.g. scaled fp8: weight * scale_weight
        w = convert(w.clone(), inplace=True)
        if kind is None and weight.dtype != torch.float32 and weight.dtype.itemsize < 2:
            kind = "scaled"
    return w, kind


def _fingerprint(w: torch.Tensor) -> str:
    """A 128-bit hash (xxh3) of the exact bytes the SVD sees, plus shape and dtype: the cache key.

    ComfyUI loads weights in inference mode (no version counter to memoise on), so every load
    hashes every adapted weight: xxh3 reads ~20 GB/s where sha1 reads ~2 (0.03 s instead of
    0.3 s for a 10-layer Flux T-LoRA)."""
    h = xxhash.xxh3_128() if xxhash is not None else hashlib.sha1()
    h.update(f"{CACHE_VERSION}|{tuple(w.shape)}|{w.dtype}".encode())
    c = w.detach().contiguous()
    if c.device.type != "cpu":
        c = c.cpu()
    h.update(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# id(weight tensor) -> (weak ref, {(slice, function): ((version, data_ptr), fingerprint)}). The version
# counter changes on any in-place write, so a patched or replaced weight is hashed again.
_FP_MEMO: dict = {}


def _memo_fingerprint(raw: torch.Tensor, tgt: "_Target", compute) -> str:
    if raw.is_inference():
        return compute()  # no version counter (ComfyUI loads weights under inference mode): hash every time
    key = (tgt.piece, getattr(tgt.fn, "__qualname__", None))
    state = (raw._version, raw.data_ptr())
    entry = _FP_MEMO.get(id(raw))
    if entry is None or entry[0]() is not raw:
        try:
            ref = weakref.ref(raw, lambda _r, i=id(raw): _FP_MEMO.pop(i, None))
        except TypeError:
            return compute()
        entry = _FP_MEMO[id(raw)] = (ref, {})
    hit = entry[1].get(key)
    if hit is None or hit[0] != state:
        hit = entry[1][key] = (state, compute())
    return hit[1]


def _is_involution(fn, w: torch.Tensor) -> bool:
    try:
        once = fn(w)
        return once.shape == w.shape and torch.equal(fn(once), w)
    except Exception:
        return False


class _Cache:
    """Base terms on disk, one small safetensors file per (exact base weight, rank, sig_type)."""

    def __init__(self, directory):
        self.dir = directory if directory else None

    def path(self, fp: str, rank: int, sig_type: str) -> Optional[str]:
        return os.path.join(self.dir, f"{fp[:32]}-r{rank}-{sig_type}.safetensors") if self.dir else None

    def get(self, fp, rank, sig_type) -> Optional[svd.BaseTerms]:
        p = self.path(fp, rank, sig_type)
        if not p or not os.path.isfile(p):
            return None
        try:
            from safetensors import safe_open

            with safe_open(p, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fp:
                    return None
                t = {k: f.get_tensor(k) for k in f.keys()}
            return svd.BaseTerms(t["p"], t["lam"], t["q"], [int(i) for i in t["ill"].tolist()],
                                 float(meta.get("est_error", 0)), meta.get("method", "") + " (cached)")
        except Exception as e:  # a damaged cache entry is recomputed
            log.warning("T-LoRA: ignoring unreadable cache entry %s: %s", p, e)
            return None

    def put(self, fp, rank, sig_type, terms: svd.BaseTerms) -> None:
        p = self.path(fp, rank, sig_type)
        if not p:
            return
        try:
            from safetensors.torch import save_file

            os.makedirs(self.dir, exist_ok=True)
            tmp = f"{p}.{os.getpid()}.tmp"
            ill = torch.tensor(terms.ill_conditioned, dtype=torch.int32)
            save_file({"p": terms.p.contiguous(), "lam": terms.lam.contiguous(), "q": terms.q.contiguous(), "ill": ill},
                      tmp, {"fingerprint": fp, "est_error": repr(terms.est_error), "method": terms.method})
            os.replace(tmp, p)
        except OSError as e:
            log.warning("T-LoRA: could not write the base-term cache %s: %s", p, e)


def default_cache_dir() -> Optional[str]:
    env = os.environ.get("COMFYUI_TLORA_CACHE")
    if env:
        return env
    try:
        import folder_paths

        return os.path.join(folder_paths.get_user_directory(), "tlora_cache")
    except Exception:
        return None


def _progress(total: int, enabled: bool):
    """ComfyUI's progress bar (UI) and tqdm (console) for the SVD work."""
    bars = []
    if enabled and total:
        try:
            bars.append(comfy.utils.ProgressBar(total))
        except Exception:
            pass
        try:
            from tqdm.auto import tqdm

            bars.append(tqdm(total=total, desc="T-LoRA base terms (SVD)", unit="layer"))
        except Exception:
            pass

    def step():
        for b in bars:
            b.update(1)

    def close():
        for b in bars:
            if hasattr(b, "close"):
                b.close()

    return step, close


def bind_tlora(model_patcher, tfile: TLoRAFile, cache_dir=None, progress: bool = True) -> BoundTLoRA:
    """Map ``tfile``'s modules onto ``model_patcher``'s diffusion model; complete LyCORIS modules.

    Raises ``TLoRAFormatError`` when nothing matches or a module's shape disagrees with its layer.
    ``cache_dir``: where rebuilt base terms are kept (None: the default, False: no cache).
    """
    model = model_patcher.model
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    notes = list(tfile.notes)
    placed: list[tuple[str, _Target]] = []
    unmatched = []
    for name in tfile.modules:
        for cand in tfile.lookup.get(name) or [name]:
            if cand in key_map:
                placed.append((name, _parse_target(key_map[cand])))
                break
        else:
            unmatched.append(name)
    family = _family(model_patcher)
    if not placed:
        sample = ", ".join(sorted(unmatched)[:4])
        raise TLoRAFormatError(tfile.path, f"nothing matches this model: a {tfile.format} file with "
                                           f"{len(unmatched)} modules, none of which is a layer of this {family} "
                                           f"model (e.g. {sample}). Was it trained for another model family?")

    # validate every placement before any SVD (and long before anything is patched)
    sd_keys = set(model.state_dict().keys())
    problems, skipped, jobs = [], [], []
    for name, tgt in placed:
        mod = tfile.modules[name]
        if not (tgt.key.startswith("diffusion_model.") and tgt.key.endswith(".weight")) or tgt.key not in sd_keys:
            skipped.append(f"{name} -> {tgt.key}")
            continue
        weight, _ = _raw_weight(model_patcher, tgt.key)
        if weight.ndim != 2:
            skipped.append(f"{name} (a {weight.ndim}-D layer: linear layers only)")
            continue
        out_f, in_f = weight.shape
        if tgt.piece is not None:
            dim, off, size = tgt.piece
            if dim != 0:
                skipped.append(f"{name} (a slice on dim {dim}: unsupported)")
                continue
            out_f = size
        if (mod.out_features, mod.in_features) != (out_f, in_f):
            problems.append(f"{name}: {mod.out_features}x{mod.in_features} in the file, {out_f}x{in_f} in the "
                            f"model ({tgt.key[len('diffusion_model.'):-len('.weight')]})")
            continue
        if tgt.fn is not None and not _is_involution(tgt.fn, torch.arange(out_f * 2, dtype=torch.float32).reshape(out_f, 2)):
            skipped.append(f"{name} (ComfyUI maps it through a function this pack cannot invert)")
            continue
        jobs.append((name, tgt))
    if problems:
        raise TLoRAFormatError(tfile.path, f"shape mismatch with this {family} model for {len(problems)} module(s) "
                               f"(trained for a different model?): " + "; ".join(problems[:4])
                               + (" ..." if len(problems) > 4 else ""))
    if skipped:
        notes.append(f"{len(skipped)} module(s) skipped: " + "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    if not jobs:
        raise TLoRAFormatError(tfile.path, f"no module of this {tfile.format} file can be placed on this {family} "
                                           f"model: " + "; ".join(skipped[:3]))

    # complete LyCORIS modules from the base weights, a layer at a time
    cache = _Cache(default_cache_dir() if cache_dir is None else cache_dir)
    device = getattr(model_patcher, "load_device", None)
    svd_jobs = [j for j in jobs if isinstance(tfile.modules[j[0]], SvdBaseTerms)]
    step, close = _progress(len(svd_jobs), progress)
    targets, base_terms, quantized, ill, cached = [], {}, [], {}, 0
    try:
        for name, tgt in jobs:
            mod = tfile.modules[name]
            if isinstance(mod, SvdBaseTerms):
                w, kind = _dequantized(model_patcher, tgt.key)
                if tgt.piece is not None:
                    w = w.narrow(0, tgt.piece[1], tgt.piece[2])
                if tgt.fn is not None:
                    w = tgt.fn(w)  # the file's (diffusers) layout of this weight
                if kind:
                    quantized.append(kind)
                fp = _memo_fingerprint(_raw_weight(model_patcher, tgt.key)[0], tgt, lambda: _fingerprint(w))
                terms = cache.get(fp, mod.rank, mod.sig_type)
                if terms is None:
                    terms = _compute(mod, w, device)
                    cache.put(fp, mod.rank, mod.sig_type, terms)
                else:
                    cached += 1
                del w
                base_terms[name] = terms
                if terms.ill_conditioned:
                    ill[name] = terms.ill_conditioned
                adapter = mod.complete_with(terms)
                step()
            else:
                adapter = mod
            if tgt.fn is not None:
                adapter = LowRankAdapter(adapter.name, tgt.fn(adapter.up), adapter.down, adapter.rank, adapter.group)
            module = tgt.key[len("diffusion_model."):-len(".weight")]
            out_slice = (tgt.piece[1], tgt.piece[2]) if tgt.piece is not None else None
            targets.append(BoundAdapter(module, out_slice, adapter))
    finally:
        close()

    matched = [name for name, _ in jobs]
    total = len(tfile.modules)
    if unmatched:
        msg = (f"partial match: {len(matched)} of {total} modules placed on this {family} model, {len(unmatched)} "
               f"have no layer here (e.g. {', '.join(sorted(unmatched)[:3])})")
        notes.append(msg)
        log.warning("T-LoRA %s: %s", os.path.basename(tfile.path), msg)
    if svd_jobs:
        notes.append(f"base terms of {len(svd_jobs)} LyCORIS module(s) rebuilt by SVD of the model's weights"
                     + (f" ({cached} from the cache)" if cached else ""))
    if quantized:
        msg = (f"{len(quantized)} base weight(s) are {sorted(set(quantized))[0]}: the SVD used their dequantized "
               "values, which differ from the weights the T-LoRA was trained on, so its base terms are approximate. "
               "Write a self-contained copy once from the original weights (T-LoRA Save Self-Contained node) "
               "and load that instead")
        notes.append(msg)
        log.warning("T-LoRA %s: %s", os.path.basename(tfile.path), msg)
    if ill:
        example = next(iter(ill))
        ranks = ", ".join(str(k) for k in ill[example][:6]) + (" ..." if len(ill[example]) > 6 else "")
        notes.append(f"{len(ill)} of {len(svd_jobs)} LyCORIS module(s) have mask boundaries where singular values "
                     f"nearly coincide (e.g. {example} at ranks {ranks}): there the trainer's own fp32 SVD defined "
                     f"the base term only to worse than {svd.REPRODUCIBLE_TOL:g} relative, so tiny differences from "
                     "training are unavoidable (typical of untrained, random weights)")
        log.info("T-LoRA %s: ill-conditioned mask boundaries: %s", os.path.basename(tfile.path), ill)
    return BoundTLoRA(targets, matched, unmatched, notes, tfile, base_terms, sorted(set(quantized)))


def _compute(mod: SvdBaseTerms, w: torch.Tensor, device) -> svd.BaseTerms:
    if device is not None and torch.device(device).type != "cpu":
        try:
            return mod.base_terms(w, device=device)
        except torch.OutOfMemoryError:
            log.warning("T-LoRA: out of memory for the SVD on %s; using the CPU", device)
    return mod.base_terms(w, device="cpu")


def save_self_contained(bound: BoundTLoRA, dst_path: str) -> str:
    """Write a copy of a LyCORIS file carrying the base terms rebuilt for this model (no SVD later)."""
    if bound.tfile is None or not bound.base_terms:
        raise ValueError("save_self_contained needs a LyCORIS T-LoRA whose base terms were rebuilt")
    if bound.quantized:
        raise ValueError(f"{os.path.basename(bound.tfile.path)}: the base weights are {bound.quantized[0]}, so base "
                         "terms rebuilt from them are approximate; write the copy from the original (unquantized) model")
    return write_self_contained(bound.tfile.path, dst_path, bound.base_terms,
                                f"top-r SVD of the base weights ({len(bound.base_terms)} modules)", allow_partial=True)
