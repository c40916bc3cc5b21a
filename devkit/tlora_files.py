"""Real T-LoRA files in every trainer's layout, for tiny ComfyUI models (tests, demo, benchmarks).

- LyCORIS ``tlora``: lycoris-lora's own ``create_lycoris`` + ``save_weights``, on the model's real
  diffusers twin (``devkit.families``: the same weights) with SimpleTuner's preset and its
  ``lycoris_config`` metadata, exactly as SimpleTuner writes it; or on ComfyUI's own modules
  (native names).
- official ControlGenAI SDXL (``pytorch_lora_weights.safetensors`` + ``logs/hparams.yml``) and Flux
  (``lora.pt`` written by ``torch.save``, as the official trainer does), vanilla and ortho;
- the seed-002 standalone Flux trainer (``tlora_weights.safetensors`` + its YAML config);
- kohya-style ``lora_down``/``lora_up``/``alpha`` with ``ss_tlora_*`` metadata.

"Training" is a deterministic perturbation of each trainer's initialisation, so deltas are non-zero
and every rank matters. ``separate_spectrum_`` gives chosen layers a trained-like spectrum (well
separated top singular values) so exactness can be checked at every mask boundary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from .host import one_thread



class Container(torch.nn.Module):
    """A plain module tree (for lycoris to wrap copies of a ComfyUI model's own layers)."""


# --- model helpers -------------------------------------------------------------------------------
def diffusers_targets(model_patcher) -> dict:
    """diffusers Linear module path -> (ComfyUI weight key, (dim, offset, size) | None), from where
    the diffusers twin's weights are in the ComfyUI model (``families.Pair.placements``)."""
    from .families import pair_of

    return {path: ("diffusion_model." + key, piece) for path, (key, piece) in pair_of(model_patcher).placements().items()}


def layer_weight(model_patcher, key: str, piece=None) -> torch.Tensor:
    w = model_patcher.model.state_dict()[key]
    if piece is not None:
        w = w.narrow(piece[0], piece[1], piece[2])
    return w


def separate_spectrum_(model_patcher, paths: Iterable[str], decay: float = 0.93, seed: int = 0) -> None:
    """Give the weights of these diffusers paths (slices of fused layers included) the spectrum
    ``s_i = s_1 * decay**i`` with random singular vectors, in place: trained weights have well
    separated top singular values, random ones (Marchenko-Pastur) do not."""
    targets = diffusers_targets(model_patcher)
    sd = model_patcher.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), one_thread():
        for path in paths:
            key, piece = targets[path]
            w = sd[key] if piece is None else sd[key].narrow(piece[0], piece[1], piece[2])
            o, i = w.shape
            k = min(o, i)
            u = torch.linalg.qr(torch.randn(o, k, generator=gen, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(i, k, generator=gen, dtype=torch.float64))[0]
            s = 2.0 * decay ** torch.arange(k, dtype=torch.float64)
            w.copy_(((u * s) @ v.t()).to(w.dtype))


# --- LyCORIS -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _lycoris_env():
    """Restore LycorisNetwork's class-level preset afterwards; skip lycoris' per-module gc.collect()
    and use one thread for its many small SVDs (seconds each otherwise, in a process with ComfyUI)."""
    import lycoris.modules.tlora
    from lycoris import LycorisNetwork

    saved = {k: getattr(LycorisNetwork, k) for k in dir(LycorisNetwork) if k.isupper()}
    threads, tlora_gc = torch.get_num_threads(), lycoris.modules.tlora.gc
    try:
        torch.set_num_threads(1)
        lycoris.modules.tlora.gc = types.SimpleNamespace(collect=lambda: 0)
        yield LycorisNetwork
    finally:
        torch.set_num_threads(threads)
        lycoris.modules.tlora.gc = tlora_gc
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)


def train_(modules, seed: int, turn: float = 0.3, lam_gain: tuple = (1.2, 2.0)) -> None:
    """Deterministic stand-in for training a lycoris ``TLoraModule``: lambda grows with the rank
    index, P and Q turn away from their SVD initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in sorted(modules, key=lambda m: m.lora_name):
            r = m.lambda_layer.shape[1]
            gains = lam_gain[0] + (lam_gain[1] - lam_gain[0]) * torch.linspace(0, 1, r)
            m.lambda_layer.mul_(gains.unsqueeze(0))
            for layer in (m.q_layer, m.p_layer):
                w = layer.weight
                w.add_(turn * torch.randn(w.shape, generator=gen) / math.sqrt(max(w.shape)))


@dataclass
class LycorisFile:
    path: Path
    modules: dict  # lora name -> lycoris TLoraModule (with lycoris' own base_q/base_p/base_lambda)
    config: dict
    network: object = None
    targets: dict = field(default_factory=dict)  # lora name -> (comfy key, piece)


def write_lycoris(model_patcher, path, rank: int = 8, alpha: Optional[float] = None, *, min_rank=2,
                  tlora_alpha=1.5, only: Optional[Iterable[str]] = None, settings: str = "metadata",
                  seed: int = 0, prefix: str = "lycoris", sig_type: Optional[str] = None,
                  dtype=torch.float32, target_module: Optional[Iterable[str]] = None) -> LycorisFile:
    """A SimpleTuner LyCORIS T-LoRA of a kit-built ComfyUI model: lycoris-lora wraps its diffusers
    twin, given the ComfyUI model's current weights first.

    ``settings``: where SimpleTuner's config goes: ``metadata`` (``lycoris_config``), ``sidecar``
    (``lycoris_config.json`` beside the file), ``both``, ``none``, or ``final`` (metadata without
    the tlora keys, as a final save may have). ``only``: diffusers module paths to wrap; else the
    ``target_module`` classes, by default the family's attention and feed-forward classes.
    ``prefix="lora_unet"``: lycoris' kohya-style names.
    """
    from .families import pair_of

    pair = pair_of(model_patcher)
    pair.sync_from_comfy()
    if target_module is None:
        target_module = pair.kit.presets.get("family", pair.kit.presets["generic"])
    lf = write_simpletuner(pair.diffusers_model, path, target_module, rank, alpha, min_rank=min_rank,
                           tlora_alpha=tlora_alpha, seed=seed, dtype=dtype, settings=settings, only=only,
                           prefix=prefix, sig_type=sig_type)
    lf.targets = {f"{prefix}_{p.replace('.', '_')}": t for p, t in diffusers_targets(model_patcher).items()}
    return lf


def write_simpletuner(root: torch.nn.Module, path, target_module: Iterable[str], rank: int = 8,
                      alpha: Optional[float] = None, *, min_rank: Optional[int] = 2, tlora_alpha: Optional[float] = 1.5,
                      seed: int = 0, dtype=torch.float32, settings: str = "metadata",
                      only: Optional[Iterable[str]] = None, prefix: str = "lycoris",
                      sig_type: Optional[str] = None) -> LycorisFile:
    """A T-LoRA saved as SimpleTuner saves one, on a real model (e.g. a diffusers transformer):
    lycoris-lora's ``create_lycoris`` with SimpleTuner's preset (``target_module`` classes, or the
    module paths ``only``), ``save_weights`` with the ``lycoris_config`` metadata (``settings``: as
    ``write_lycoris``). The model is left as it was (its weights untouched, lycoris unhooked)."""
    from lycoris import create_lycoris
    from lycoris.modules.tlora import TLoraModule

    path = Path(path)
    preset = ({"target_module": [], "target_name": list(only), "use_fnmatch": True} if only is not None
              else {"target_module": list(target_module)})
    cfg = {"algo": "tlora", "multiplier": 1.0, "linear_dim": rank, "linear_alpha": alpha if alpha is not None else rank,
           "apply_preset": preset}
    if min_rank is not None:
        cfg["tlora_min_rank"] = min_rank
    if tlora_alpha is not None:
        cfg["tlora_alpha"] = tlora_alpha
    if sig_type is not None:
        cfg["sig_type"] = sig_type
    kwargs = {k: v for k, v in cfg.items() if k not in ("multiplier", "linear_dim", "linear_alpha", "apply_preset")}
    with _lycoris_env() as LycorisNetwork:
        LycorisNetwork.apply_preset(dict(preset, lora_prefix=prefix))
        net = create_lycoris(root, cfg["multiplier"], cfg["linear_dim"], cfg["linear_alpha"], **kwargs)
        net.apply_to()  # registers the modules with the network (its state_dict is the file)
        net.restore()  # and gives the model its own forward back
    modules = {m.lora_name: m for m in net.loras if isinstance(m, TLoraModule)}
    if not modules:
        raise RuntimeError(f"lycoris-lora wrapped no module with {preset}")
    train_(modules.values(), seed)
    meta_cfg = dict(cfg)
    if settings == "final":
        meta_cfg.pop("tlora_min_rank", None)
        meta_cfg.pop("tlora_alpha", None)
    metadata = {"lycoris_config": json.dumps(meta_cfg)} if settings in ("metadata", "both", "final") else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), dtype, metadata)
    if settings in ("sidecar", "both"):
        (path.parent / "lycoris_config.json").write_text(json.dumps(cfg, indent=2))
    return LycorisFile(path, modules, cfg, net, {})


def write_lycoris_native(model_patcher, path, module_paths: Iterable[str], rank: int = 8, alpha=None, seed: int = 0,
                         min_rank=2, tlora_alpha=1.5) -> LycorisFile:
    """lycoris-lora wrapping ComfyUI's own layers (``lycoris_double_blocks_0_img_attn_qkv``...),
    as a trainer working on ComfyUI-layout models names them. Layers are deep-copied first."""
    import copy

    from lycoris import create_lycoris
    from lycoris.modules.tlora import TLoraModule

    dm = model_patcher.model.diffusion_model
    root = Container()
    for p in module_paths:
        src, dst = dm, root
        segs = p.split(".")
        for seg in segs[:-1]:
            src = getattr(src, seg)
            if not hasattr(dst, seg):
                dst.add_module(seg, Container())
            dst = getattr(dst, seg)
        lin = getattr(src, segs[-1])
        new = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
        with torch.no_grad():
            new.weight.copy_(lin.weight.float())
        dst.add_module(segs[-1], new)
    cfg = {"algo": "tlora", "multiplier": 1.0, "linear_dim": rank, "linear_alpha": alpha or rank,
           "tlora_min_rank": min_rank, "tlora_alpha": tlora_alpha}
    with _lycoris_env() as LycorisNetwork:
        LycorisNetwork.apply_preset({"target_module": ["Linear"], "lora_prefix": "lycoris"})
        net = create_lycoris(root, 1.0, rank, cfg["linear_alpha"], algo="tlora")
        net.apply_to()
    modules = {m.lora_name: m for m in net.loras if isinstance(m, TLoraModule)}
    train_(modules.values(), seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(cfg)})
    return LycorisFile(path, modules, cfg, net, {})


# --- official ControlGenAI -----------------------------------------------------------------------
OFFICIAL_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
                 "add_q_proj": "to_q_proj", "add_k_proj": "to_k_proj", "add_v_proj": "to_v_proj"}


def _vanilla_terms(o, i, r, gen):
    down = torch.randn(r, i, generator=gen) / r  # nn.init.normal_(std=1/rank)
    up = 0.5 * torch.randn(o, r, generator=gen) / math.sqrt(r)  # "trained" from zeros
    return {"down.weight": down, "up.weight": up}


def _ortho_terms(o, i, r, gen, base_weight=None):
    """Official ``ortho_lora``: SVD of a random (in, out) matrix (or of the layer, ``lortho_lora``),
    stored with its frozen copy; the trained terms move away from it."""
    with one_thread():  # small SVDs: OpenMP sync dominates on a busy CPU
        if base_weight is None:
            u, s, v = torch.linalg.svd(torch.normal(0, 1 / r, size=(i, o), generator=gen))
            q, p, lam = u[:r].clone(), v[:, :r].clone(), s[None, :r].clone()
        else:
            u, s, v = torch.linalg.svd(base_weight.float())
            q, p, lam = v[:r].clone(), u[:, :r].clone(), s[None, :r].clone()
    t = {"base_q.weight": q.clone(), "base_p.weight": p.clone(), "base_lambda": lam.clone()}
    t["q_layer.weight"] = q + 0.2 * torch.randn(q.shape, generator=gen) / math.sqrt(i)
    t["p_layer.weight"] = p + 0.2 * torch.randn(p.shape, generator=gen) / math.sqrt(r)
    t["lambda_layer"] = lam * (1 + 0.5 * torch.rand(lam.shape, generator=gen))
    return t


def _attention_paths(targets: dict) -> dict:
    """attention path -> {proj: (out, in)} from diffusers Linear paths."""
    out = {}
    for path, (key, piece) in targets.items():
        for proj in OFFICIAL_PROJ:
            if path.endswith("." + proj):
                out.setdefault(path[: -len(proj) - 1], {})[proj] = (key, piece)
    return out


def _hparams(run_dir: Path, values: dict) -> None:
    import yaml

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs" / "hparams.yml").write_text(yaml.safe_dump(values))


def write_official_sdxl(model_patcher, run_dir, rank: int = 4, variant: str = "vanilla", min_rank: int = 1,
                        alpha_rank_scale: float = 1.0, seed: int = 0, step: int = 200, hparams: bool = True,
                        prefix: str = "") -> Path:
    """``<run>/checkpoint-<step>/pytorch_lora_weights.safetensors`` (+ ``<run>/logs/hparams.yml``)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for attn, projs in sorted(_attention_paths(diffusers_targets(model_patcher)).items()):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            if proj not in projs:
                continue
            w = layer_weight(model_patcher, *projs[proj])
            o, i = w.shape
            r = min(rank, o, i)
            terms = _vanilla_terms(o, i, r, gen) if variant == "vanilla" else _ortho_terms(
                o, i, r, gen, w if variant == "lortho" else None)
            for t, v in terms.items():
                sd[f"{prefix}{attn}.processor.{OFFICIAL_PROJ[proj]}_lora.{t}"] = v.contiguous()
    path = run_dir / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    if hparams:
        _hparams(run_dir, {"trainer_type": {"vanilla": "lora", "ortho": "ortho_lora", "lortho": "lortho_lora"}[variant],
                           "lora_rank": rank, "min_rank": min_rank, "alpha_rank_scale": alpha_rank_scale,
                           "sig_type": "last", "output_dir": str(run_dir)})
    return path


def write_official_flux(model_patcher, run_dir, rank: int = 4, min_rank: int = 1, seed: int = 0, step: int = 100,
                        hparams: bool = True, tlora: bool = True) -> Path:
    """``<run>/checkpoint-<step>/lora.pt``: ``torch.save`` of the processors' state dict, including
    the modules the official Flux processor creates but never uses in single blocks."""
    run_dir = Path(run_dir)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    attns = _attention_paths(diffusers_targets(model_patcher))
    hidden = model_patcher.model.model_config.unet_config["hidden_size"]
    for attn in sorted(attns):
        for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"):
            terms = _vanilla_terms(hidden, hidden, rank, gen)
            if proj not in attns[attn]:
                terms["up.weight"].zero_()  # created by the processor, never trained
            for t, v in terms.items():
                sd[f"{attn}.processor.{OFFICIAL_PROJ[proj]}_lora.{t}"] = v.contiguous()
    path = run_dir / f"checkpoint-{step}" / "lora.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    from collections import OrderedDict

    torch.save(OrderedDict(sd), str(path))
    if hparams:
        _hparams(run_dir, {"tlora": tlora, "rank": rank, "min_rank": min_rank, "output_dir": str(run_dir),
                           "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev"})
    return path


# --- seed-002 standalone Flux trainer ------------------------------------------------------------
SEED002_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def write_seed002(model_patcher, run_dir, rank: int = 4, lora_alpha: float = 8.0, min_rank: int = 1,
                  alpha_rank_scale: float = 1.0, variant: str = "vanilla", seed: int = 0, config: bool = True,
                  enable_rank_masking: bool = True, prefix: str = "") -> Path:
    """``<run>/final/tlora_weights.safetensors`` + ``<run>/flux_tlora.yaml`` (the trainer's config)."""
    import yaml
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for path_, (key, piece) in sorted(diffusers_targets(model_patcher).items()):
        if not path_.endswith(tuple("." + t for t in SEED002_TARGETS)):
            continue
        w = layer_weight(model_patcher, key, piece)
        o, i = w.shape
        if variant == "vanilla":
            terms = _vanilla_terms(o, i, rank, gen)
        else:  # OrthoTLoRALinear: SVD of the base layer, frozen copy kept as buffers
            t = _ortho_terms(o, i, rank, gen, w)
            terms = {"q_layer.weight": t["q_layer.weight"], "p_layer.weight": t["p_layer.weight"],
                     "lambda_layer": t["lambda_layer"], "base_q": t["base_q.weight"], "base_p": t["base_p.weight"],
                     "base_lambda": t["base_lambda"]}
        for t, v in terms.items():
            sd[f"{prefix}{path_}.{t}"] = v.contiguous()
    path = run_dir / "final" / "tlora_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    if config:
        (run_dir / "flux_tlora.yaml").write_text(yaml.safe_dump({
            "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev", "lora_rank": rank,
            "lora_alpha": lora_alpha, "min_rank": min_rank, "alpha_rank_scale": alpha_rank_scale,
            "enable_rank_masking": enable_rank_masking, "trainer_type": "lora" if variant == "vanilla" else "ortho_lora",
            "target_modules": list(SEED002_TARGETS)}))
    return path


# --- kohya-style ----------------------------------------------------------------------------------
def native_linears(model_patcher, contains: Iterable[str] = ("attn", "mlp", "linear", "proj", "ff")) -> list[str]:
    """ComfyUI-native module paths of 2-D weights in the diffusion model matching ``contains``."""
    out = []
    for k, v in model_patcher.model.diffusion_model.state_dict().items():
        if k.endswith(".weight") and v.ndim == 2 and any(c in k for c in contains):
            out.append(k[: -len(".weight")])
    return sorted(out)


def write_kohya(model_patcher, path, rank: int = 4, alpha: float = 2.0, *, min_rank: int = 1,
                alpha_rank_scale: float = 2.0, max_timestep: int = 1000, tlora_metadata: bool = True,
                modules: Optional[Iterable[str]] = None, seed: int = 0, text_encoder: bool = False) -> Path:
    """``lora_unet_<native path>.lora_down/lora_up/alpha`` with ``ss_tlora_*`` metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    dm_sd = model_patcher.model.diffusion_model.state_dict()
    sd = {}
    for m in modules if modules is not None else native_linears(model_patcher):
        o, i = dm_sd[m + ".weight"].shape
        name = "lora_unet_" + m.replace(".", "_")
        sd[name + ".lora_down.weight"] = torch.randn(rank, i, generator=gen) / math.sqrt(i)
        sd[name + ".lora_up.weight"] = 0.3 * torch.randn(o, rank, generator=gen) / math.sqrt(rank)
        sd[name + ".alpha"] = torch.tensor(float(alpha))
    if text_encoder:
        sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(rank, 8, generator=gen)
        sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(8, rank, generator=gen)
        sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(float(alpha))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    if tlora_metadata:
        metadata.update({"ss_tlora_min_rank": str(min_rank), "ss_tlora_alpha_rank_scale": str(alpha_rank_scale),
                         "ss_tlora_max_timestep": str(max_timestep)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata)
    return path
