"""Tiny real models of every family SimpleTuner trains T-LoRA for: a diffusers model (the module
names and classes SimpleTuner's files carry) and the ComfyUI model with the same weights, built
the way ComfyUI builds one from a file.

Two ways to the same weights, one per family (``Kit.direction``):

- ``diffusers``: where ComfyUI loads diffusers-format files itself (Flux, SD3, AuraFlow, PixArt, and
  families whose ComfyUI layout is diffusers'), the diffusers model's state dict goes through
  ComfyUI's own loader (``comfy.sd.load_diffusion_model_state_dict``: its conversion and detection);
- ``comfy``: elsewhere a ComfyUI model is made from the host's own model class with the host's
  config defaults and a few sizes (``Kit.comfy_sizes``), its state dict rebuilt through ComfyUI's
  detection, and turned into the diffusers model by diffusers' own single-file converter
  (``Kit.converter``). The way back (for the merged reference weights) is that converter
  inverted exactly by probing it with a state dict of element ids (``inverse_by_probe``).

Neither way uses the pack's own name maps, which the tests check against these models.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..host import one_thread

@dataclass
class Kit:
    family: str  # SimpleTuner's name of the family
    comfy_class: str  # the ComfyUI model config class (comfy.supported_models) the model must be
    diffusers_class: str  # the diffusers model class SimpleTuner trains
    diffusers_config: dict  # its tiny config
    direction: str  # "diffusers" or "comfy" (see the module docstring)
    conditioning: Callable  # (kit, generator) -> (positive, negative) in ComfyUI's conditioning format
    latent_shape: tuple  # the latent one sampling call gets (a frame axis for video families)
    # preset name -> lycoris ``target_module`` list (SimpleTuner's documented generic preset, the family's classes)
    presets: dict = field(default_factory=lambda: {"generic": ["Attention", "FeedForward"]})
    # direction "comfy": sizes over the host's defaults; or a function giving them on the host in
    # use, where hosts' model classes take different fields (Flux gained txt_ids_dims in 0.28)
    comfy_sizes: object = field(default_factory=dict)
    # direction "comfy": diffusers' converter (ComfyUI layout -> diffusers): a function name of
    # diffusers.loaders.single_file_utils, or a function of the state dict calling one
    converter: Optional[object] = None
    # where ComfyUI's detection hard-codes a size of the real model (Flux: 24 heads), the fields that
    # the tiny one needs instead, from the detected config: the host's other defaults stay
    detection_fix: Optional[Callable[[dict], dict]] = None
    # direction "comfy": name prefixes of ComfyUI weights the diffusers model does not have (LTX-2's
    # text connectors, a model of their own in diffusers, which its converter drops): they keep
    # the ComfyUI layout's values
    comfy_only: tuple = ()
    # diffusers module path prefixes whose weights keep the seeded init where the exactness test gives
    # the others decaying spectra (layers no preset adapts): in a model without biases (Flux.2)
    # decayed modulation and time layers shrink every gate to ~1e-3, and the adapter's effect below
    # fp32 rounding of the output; wide embedders (HunyuanVideo 1.5's ByT5 mapper) only cost time
    keep_init: tuple = ()
    # direction "diffusers": (old, new) key prefixes renamed before ComfyUI's loader sees the diffusers
    # state dict, for layers no preset adapts that ComfyUI's conversion knows by another family's
    # name (LongCat-Image's time_embed, which ComfyUI's Flux conversion calls time_text_embed)
    diffusers_renames: tuple = ()
    min_host: tuple = (0, 3, 75)  # the first ComfyUI version with this family
    video: bool = False
    # six noise levels to check at (flow sigmas by default; discrete kits give timesteps' sigmas)
    sigmas: Callable = field(default=lambda model: [0.97, 0.8, 0.62, 0.41, 0.2, 0.04])
    # the timestep SimpleTuner computes the mask from at the sigma ComfyUI samples with (its
    # pipelines, written out from its source: flow families 1000 * sigma)
    simpletuner_t: Callable = field(default=lambda model_sampling, sigma: 1000.0 * float(sigma))
    # how many distinct masks the six noise levels must cover (Cosmos: its EDM sigmas, at most 80 of
    # SimpleTuner's T = 1000, give only two)
    min_masks: int = 3


@dataclass
class Pair:
    """A diffusers model and the ComfyUI model with the same weights."""

    kit: Kit
    diffusers_model: torch.nn.Module
    model: object  # the ComfyUI ModelPatcher
    to_comfy: Callable[[dict], dict]  # diffusers state dict -> ComfyUI diffusion-model state dict
    from_comfy: Optional[Callable[[dict], dict]] = None  # the way back (None: found by probing when needed)

    def comfy_state_dict(self, diffusers_sd: Optional[dict] = None) -> dict:
        return self.to_comfy(dict(diffusers_sd if diffusers_sd is not None else self.diffusers_model.state_dict()))

    def sync_from_comfy(self) -> None:
        """The diffusers model takes the ComfyUI model's current weights (tests change those in place)."""
        if self.from_comfy is None:
            self.from_comfy = inverse_by_probe(self.to_comfy, dict(self.diffusers_model.state_dict()))
        sd = {n: t.detach().float() for n, t in self.model.model.diffusion_model.state_dict().items()}
        with torch.no_grad():
            self.diffusers_model.load_state_dict(self.from_comfy(sd), strict=False)

    def placements(self) -> dict:
        """diffusers Linear module path -> (ComfyUI weight key, (0, offset, size) or None), found by
        where its weight's values are in the ComfyUI model: a whole weight, or rows of a fused one.
        Layers ComfyUI stores transformed (Flux's swapped norm_out halves) have no placement."""
        comfy = {n: t for n, t in self.model.model.diffusion_model.state_dict().items() if t.ndim == 2}
        out = {}
        for path, mod in self.diffusers_model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            w = mod.weight.detach()
            for key, c in comfy.items():
                if c.shape[1] != w.shape[1] or c.shape[0] < w.shape[0]:
                    continue
                starts = (c.to(w.dtype) == w[0]).all(1).nonzero().reshape(-1).tolist()
                off = next((o for o in starts if torch.equal(c[o:o + w.shape[0]].to(w.dtype), w)), None)
                if off is not None:
                    out[path] = (key, None if c.shape[0] == w.shape[0] else (0, off, w.shape[0]))
                    break
        return out


def twin(model_patcher, diffusers_class: str, diffusers_config: dict, converter: Callable[[dict], dict]) -> torch.nn.Module:
    """A diffusers model with a ComfyUI model's current weights, by diffusers' own converter (for a
    model not built by ``build``, e.g. one ComfyUI loaded from a checkpoint file)."""
    import diffusers

    dm = getattr(diffusers, diffusers_class)(**diffusers_config).float().eval()
    sd = {n: t.detach().float() for n, t in model_patcher.model.diffusion_model.state_dict().items()}
    missing, unexpected = dm.load_state_dict(converter(sd), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{diffusers_class}: the converted weights do not fit ({missing[:3]} missing, "
                           f"{unexpected[:3]} unexpected)")
    return dm


def pair_of(model_patcher) -> Pair:
    """The kit pair a ComfyUI model was built from (``build``; clones share it)."""
    pair = getattr(model_patcher.model, "devkit_pair", None)
    if pair is None:
        raise ValueError("this model was not built by devkit.families.build: it has no diffusers twin")
    return pair


def kits() -> list[Kit]:
    """Every family's kit: one module each in this package."""
    return [importlib.import_module(f"{__name__}.{m.name}").KIT for m in pkgutil.iter_modules(__path__)]


def kit(family: str) -> Kit:
    return next(k for k in kits() if k.family == family)


def host_version() -> tuple:
    import comfyui_version

    return tuple(int(p) for p in comfyui_version.__version__.split(".")[:3])


def runs_here(k: Kit) -> bool:
    return host_version() >= k.min_host


# --- building ------------------------------------------------------------------------------------
def seeded_init_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter from a seeded generator (fan-in scaled normal; norm scales 1): ComfyUI's
    layers skip initialisation, and a diffusers model's zero-initialised output layers would make
    the adapter's effect vanish."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith(("scale", "norm.weight")) or ("norm" in name and name.endswith("weight")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def diffusers_model(k: Kit) -> torch.nn.Module:
    import diffusers

    return getattr(diffusers, k.diffusers_class)(**k.diffusers_config).float().eval()


def comfy_model(sd: dict, comfy_class: str, detection_fix: Optional[Callable[[dict], dict]] = None,
                dtype=torch.float32, manual_cast=None):
    """A ComfyUI ModelPatcher from a diffusion-model state dict, as ComfyUI's UNETLoader makes it
    (``load_diffusion_model_state_dict``: conversion of diffusers files, detection of the config),
    with weights in ``dtype`` (computed in ``manual_cast`` where given). Where detection finds no config for such tiny sizes (the UNets' match tables list
    real sizes only) or hard-codes a real size (``detection_fix``), the named config class with the
    config ComfyUI's detection derived (and the fix) after ComfyUI's own diffusers conversion."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    patcher = None
    if detection_fix is None and manual_cast is None:
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype})
    if patcher is None:
        # ComfyUI's loader order: its own layout first, diffusers' conversion only where that finds
        # nothing (a ComfyUI NextDiT's x_embedder.weight would read as a diffusers Flux file)
        unet_config = comfy.model_detection.detect_unet_config(sd, "")
        converted = None if unet_config is not None else comfy.model_detection.convert_diffusers_mmdit(dict(sd), "")
        if converted is not None:
            sd = converted
            unet_config = comfy.model_detection.detect_unet_config(sd, "")
        if detection_fix is not None:
            unet_config.update(detection_fix(unet_config))
        config = getattr(comfy.supported_models, comfy_class)(unet_config)
        config.set_inference_dtype(dtype, manual_cast)
        model = config.get_model(sd, "")
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{comfy_class}: state dict does not fit ({missing[:3]} missing, {unexpected[:3]} unexpected)")
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
    got = type(patcher.model.model_config).__name__
    if got != comfy_class:
        raise RuntimeError(f"ComfyUI detected this state dict as {got}, not {comfy_class}")
    return patcher


def _comfy_layout(k: Kit, seed: int) -> dict:
    """Direction "comfy": a state dict in ComfyUI's layout from the host's own model class with
    its config defaults and the kit's sizes, rebuilt once through detection (so the sizes are what
    ComfyUI itself derives from such a file)."""
    import comfy.supported_models

    sizes = k.comfy_sizes() if callable(k.comfy_sizes) else k.comfy_sizes
    config = getattr(comfy.supported_models, k.comfy_class)(dict(sizes))
    config.set_inference_dtype(torch.float32, None)
    first = config.get_model({}, "")
    seeded_init_(first.diffusion_model, seed)
    sd = {n: t.detach().clone() for n, t in first.diffusion_model.state_dict().items()}
    detected = comfy_model(sd, k.comfy_class, k.detection_fix).model.diffusion_model.state_dict()
    if {n: tuple(t.shape) for n, t in detected.items()} != {n: tuple(t.shape) for n, t in sd.items()}:
        raise RuntimeError(f"{k.family}: ComfyUI's detection sizes these weights differently; pick sizes it reproduces")
    return sd


def _converter(k: Kit) -> Callable[[dict], dict]:
    from diffusers.loaders import single_file_utils

    fn = getattr(single_file_utils, k.converter) if isinstance(k.converter, str) else k.converter
    return lambda sd: fn(dict(sd))


def with_split_sizes(converter: Callable[[dict], dict], sizes: dict) -> Callable[[dict], dict]:
    """``converter`` (a diffusers single-file converter) with the fused-layer split sizes it
    hard-codes for the real model (``sizes``: real tuple -> tiny tuple) replaced by the tiny
    model's, for the duration of each call: its ``torch.split`` is the only thing that changes."""
    import types

    from diffusers.loaders import single_file_utils

    def split(tensor, split_size_or_sections, dim=0):
        if isinstance(split_size_or_sections, (list, tuple)):
            split_size_or_sections = sizes.get(tuple(split_size_or_sections), split_size_or_sections)
        return torch.split(tensor, split_size_or_sections, dim=dim)

    def convert(sd: dict) -> dict:
        real = single_file_utils.torch
        shim = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
        shim.split = split
        single_file_utils.torch = shim
        try:
            return converter(sd)
        finally:
            single_file_utils.torch = real

    return convert


def inverse_by_probe(convert: Callable[[dict], dict], layout: dict) -> Callable[[dict], dict]:
    """The exact inverse of ``convert`` (ComfyUI layout -> diffusers) on state dicts shaped like
    ``layout``, for converters that only move elements (rename, split, concatenate, transpose):
    every element of a probe state dict holds its own id, so the converted probe tells, for every
    element of every diffusers tensor, the ComfyUI tensor and position it came from."""
    names = sorted(layout)
    ids, start = {}, 0
    for n in names:
        count = layout[n].numel()
        ids[n] = torch.arange(start, start + count, dtype=torch.float64).reshape(layout[n].shape)
        start += count
    probe = convert(ids)
    where = {}  # diffusers key -> (flat source ids)
    covered = torch.zeros(start, dtype=torch.bool)
    for dk, t in probe.items():
        t = t.double().reshape(-1)
        if not torch.equal(t, t.round()) or (t < 0).any() or (t >= start).any():
            raise RuntimeError(f"the converter computes {dk} instead of moving elements: no exact inverse")
        src = t.long()
        if covered[src].any():
            raise RuntimeError(f"the converter uses an element twice ({dk}): no exact inverse")
        covered[src] = True
        where[dk] = src
    if not bool(covered.all()):
        lost = [n for n in names if not bool(covered[ids[n].reshape(-1).long()].all())]
        raise RuntimeError(f"the converter drops ComfyUI weights ({lost[:3]}): no exact inverse")
    offsets = {n: (int(ids[n].reshape(-1)[0]), layout[n].shape, layout[n].dtype) for n in names}

    def inverse(diffusers_sd: dict) -> dict:
        flat = torch.empty(start, dtype=torch.float64)
        for dk, src in where.items():
            flat[src] = diffusers_sd[dk].double().reshape(-1)
        return {n: flat[o:o + math.prod(shape)].reshape(shape).to(dtype) for n, (o, shape, dtype) in offsets.items()}

    return inverse


def build(k: Kit, seed: int = 0, prepare: Optional[Callable[[torch.nn.Module], None]] = None) -> Pair:
    """The pair for kit ``k``; ``prepare(diffusers_model)`` may change the diffusers weights first
    (e.g. give adapted layers trained-like spectra); the ComfyUI model gets the result."""
    with one_thread():
        dm = diffusers_model(k)
        if k.direction == "diffusers":
            seeded_init_(dm, seed)
            to_comfy = _diffusers_to_comfy(k)
        else:
            layout = _comfy_layout(k, seed)
            kept = {n: t for n, t in layout.items() if n.startswith(tuple(k.comfy_only))} if k.comfy_only else {}
            layout = {n: t for n, t in layout.items() if n not in kept}
            convert = _converter(k)
            missing, unexpected = dm.load_state_dict(convert(layout), strict=False)
            if missing or unexpected:
                raise RuntimeError(f"{k.family}: diffusers' converter gives keys the diffusers model lacks or misses "
                                   f"({missing[:3]} missing, {unexpected[:3]} unexpected)")
            to_comfy = _keeping(inverse_by_probe(convert, layout), kept)
        if prepare is not None:
            prepare(dm)
        model = comfy_model(to_comfy(dict(dm.state_dict())), k.comfy_class, k.detection_fix)
    from_comfy = None if k.direction == "diffusers" else (lambda sd: convert({n: t for n, t in sd.items() if n not in kept}))
    pair = Pair(k, dm, model, to_comfy, from_comfy)
    model.model.devkit_pair = pair
    return pair


def _keeping(inverse: Callable[[dict], dict], kept: dict) -> Callable[[dict], dict]:
    """``inverse`` plus the ComfyUI-only weights ``kept`` (``Kit.comfy_only``) as they are."""
    if not kept:
        return inverse
    return lambda sd: {**inverse(sd), **{n: t.clone() for n, t in kept.items()}}


def _diffusers_to_comfy(k: Kit) -> Callable[[dict], dict]:
    """Direction "diffusers": ComfyUI's own loader converts; its model's state dict is the result."""

    def to_comfy(sd: dict) -> dict:
        # copies: ComfyUI's convert_diffusers_mmdit writes its swap_scale_shift results into the
        # given tensors (SD3's last context norm and norm_out), which would change the caller's weights
        sd = {_renamed(n, k.diffusers_renames): t.detach().clone() for n, t in sd.items()}
        model = comfy_model(sd, k.comfy_class, k.detection_fix).model.diffusion_model
        return {n: t.detach().clone() for n, t in model.state_dict().items()}

    return to_comfy


def _renamed(name: str, renames: tuple) -> str:
    return next((new + name[len(old):] for old, new in renames if name.startswith(old)), name)


# --- sampling inputs -----------------------------------------------------------------------------
def latent(k: Kit, seed: int = 3) -> torch.Tensor:
    return torch.randn(k.latent_shape, generator=torch.Generator().manual_seed(seed))


def conditioning(k: Kit, seed: int = 1):
    return k.conditioning(k, torch.Generator().manual_seed(seed))
