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


# --- the T-LoRA trainers of 2026 -----------------------------------------------------------------
# Each writer does what that trainer's own save code does (key names, what is saved, the dtype cast
# of every tensor, metadata strings), read from its source: the Anima kohya fork
# (orangemagic123/sd-scripts networks/lora_tlora_anima.py + convert_tlora_anima_to_comfy.py @cb1be1c),
# takenoko (seruva19/takenoko src/networks/t_lora.py + lora_wan.py @72c42ad), Fizgig's Krea 2 trainer
# (tachytelicdetonation/Fizgig src/fizgig/networks/lora.py + krea2/trainer.py @0cdfbed) and LyCORIS
# PR #280's rank-2r export (orangemagic123/LyCORIS lycoris/modules/tlora.py @36b0db5). The model may
# be a ComfyUI ModelPatcher or a bare diffusion-model module (format tests).
ANIMA_TARGETS = ("Block", "PatchEmbed", "TimestepEmbedding", "FinalLayer")
ANIMA_EXCLUDE = r".*(_modulation|_norm|_embedder|final_layer).*"  # appended by the fork's create_network
ANIMA_TLORA_KEYS = ("ss_tlora_init", "ss_tlora_sig_type", "ss_tlora_min_rank", "ss_tlora_alpha_rank_scale",
                    "ss_tlora_max_timestep")
TAKENOKO_TARGETS = ("WanAttentionBlock",)
FIZGIG_ADAPTER_WEIGHTS = ("T-LoRA raw weights: inference must apply the timestep rank mask; as a plain LoRA it "
                          "runs at full rank")


def _dit(model) -> torch.nn.Module:
    return getattr(getattr(model, "model", None), "diffusion_model", model)


def kohya_modules(root: torch.nn.Module, prefix: str, targets: Optional[Iterable[str]] = None,
                  exclude: Optional[str] = None) -> dict:
    """lora name -> Linear, as sd-scripts' ``create_modules`` (and the trainers built on it) finds and
    names them: the Linears inside modules of the ``targets`` classes (every Linear of ``root`` when
    None), ``f"{prefix}.{path}".replace(".", "_")``, minus paths ``exclude`` fully matches."""
    import re

    out = {}
    for name, module in root.named_modules():
        if targets is not None and type(module).__name__ not in targets:
            continue
        scope = root if targets is None else module
        for child_name, child in scope.named_modules():
            if type(child).__name__ != "Linear":
                continue
            path = (name + "." if name else "") + child_name
            if exclude is not None and re.fullmatch(exclude, path):
                continue
            out[f"{prefix}.{path}".replace(".", "_")] = child
        if targets is None:
            break
    return out


def _sshs(sd: dict, metadata: dict) -> dict:
    """sd-scripts' ``precalculate_safetensors_hashes`` (takenoko's and Fizgig's are the same): the
    file's tensor bytes hashed with only its ``ss_*`` metadata."""
    import hashlib

    from safetensors.torch import save

    b = save(sd, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(b[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(b[8 + n:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]}


def _save_hashed(sd: dict, path: Path, metadata: dict) -> dict:
    from safetensors.torch import save_file

    metadata = dict(metadata)
    metadata.update(_sshs(sd, metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata)
    return metadata


def _kaiming_down(r: int, i: int, gen) -> torch.Tensor:
    """``kaiming_uniform_(a=sqrt(5))`` of a (r, in) weight: U(-1/sqrt(in), 1/sqrt(in))."""
    return (torch.rand(r, i, generator=gen) * 2 - 1) / math.sqrt(i)


def _trained_plain(down: torch.Tensor, o: int, gen) -> tuple:
    """A trained (down, up) from kohya's init (kaiming down, zero up)."""
    r, i = down.shape
    return (down + 0.3 * torch.randn(r, i, generator=gen) / math.sqrt(i),
            0.5 * torch.randn(o, r, generator=gen) / math.sqrt(r))


def _trained_ortho(q0, p0, lam0, gen) -> tuple:
    """Trained (q, p, lambda) from an orthogonal init: P and Q turn away from it, lambda grows (by a
    term of its own too, so a "last" init's tiny singular values give a visible adapter)."""
    r, i = q0.shape
    ramp = torch.linspace(0, 1, r).reshape(1, r)
    q = q0 + 0.2 * torch.randn(q0.shape, generator=gen) / math.sqrt(i)
    p = p0 + 0.2 * torch.randn(p0.shape, generator=gen) / math.sqrt(r)
    lam = lam0.reshape(1, r) * (1.2 + 0.8 * ramp) + 0.2 * (0.5 + torch.rand(1, r, generator=gen))
    return q, p, lam


def _anima_orthogonal_init(i: int, o: int, r: int, sig_type: str, gen) -> tuple:
    """``OrthogonalTLoRAModule`` random init (since b706368): QR bases, lambda a linspace of the
    singular values a Gaussian(0, 1/r) matrix would have."""
    q = torch.linalg.qr(torch.randn(i, r, generator=gen))[0].T.contiguous()
    p = torch.linalg.qr(torch.randn(o, r, generator=gen))[0].contiguous()
    std = 1.0 / r
    sv_max, sv_min = std * (math.sqrt(i) + math.sqrt(o)), std * abs(math.sqrt(i) - math.sqrt(o))
    if sig_type == "principal":
        lam = torch.linspace(sv_max, (sv_max + sv_min) / 2, r)
    elif sig_type == "middle":
        mid, spread = (sv_max + sv_min) / 2, (sv_max - sv_min) / 4
        lam = torch.linspace(mid + spread, mid - spread, r)
    else:
        lam = torch.linspace((sv_max + sv_min) / 2, sv_min + 1e-6, r)
    return q, p, lam.unsqueeze(0)


def _anima_layer_init(weight: torch.Tensor, r: int, sig_type: str) -> tuple:
    """``layer_orthogonal``: the layer's fp32 SVD, the window ``sig_type`` picks."""
    with one_thread():
        u, s, v = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    if sig_type == "principal":
        return v[:r].clone(), u[:, :r].clone(), s[None, :r].clone()
    if sig_type == "middle":
        sv, su, ss = (math.ceil((n - r) / 2) for n in (v.shape[0], u.shape[1], s.shape[0]))
        return v[sv:sv + r].clone(), u[:, su:su + r].clone(), s[None, ss:ss + r].clone()
    return v[-r:].clone(), u[:, -r:].clone(), s[None, -r:].clone()


def anima_comfy_name(key: str) -> str:
    """The fork's ``rename_sd_scripts_key_to_comfy`` (the DiT rules; ``_comfy`` sibling keys)."""
    is_dit = key.startswith("lora_unet_")
    module, weight = "_".join(key.split("_")[2:]).split(".", 1)
    if weight.startswith("lora_up"):
        weight = weight.replace("lora_up", "lora_B")
    elif weight.startswith("lora_down"):
        weight = weight.replace("lora_down", "lora_A")
    module = module.replace("_", ".")
    for a, b in [("llm.adapter", "llm_adapter"), (".linear.", ".linear_"), ("t.embedding.norm", "t_embedding_norm"),
                 ("t.embedder", "t_embedder"), ("x.embedder", "x_embedder"), ("extra.pos.embedder", "extra_pos_embedder"),
                 ("rotary.emb", "rotary_emb"), ("in.proj", "in_proj"), ("cross.attn", "cross_attn"),
                 ("self.attn", "self_attn"), ("q.proj", "q_proj"), ("q.norm", "q_norm"), ("k.proj", "k_proj"),
                 ("k.norm", "k_norm"), ("v.proj", "v_proj"), ("v.norm", "v_norm"), ("o.proj", "o_proj"),
                 ("output.proj", "output_proj"), ("out.proj", "out_proj"), ("final.layer", "final_layer"),
                 ("adaln.modulation.cross_attn", "adaln_modulation_cross_attn"),
                 ("adaln.modulation.self_attn", "adaln_modulation_self_attn"),
                 ("adaln.modulation.mlp", "adaln_modulation_mlp"), ("layer.norm.cross_attn", "layer_norm_cross_attn"),
                 ("layer.norm.self_attn", "layer_norm_self_attn"), ("layer.norm.mlp", "layer_norm_mlp"),
                 ("norm.cross_attn", "norm_cross_attn"), ("norm.self_attn", "norm_self_attn"),
                 ("norm.mlp", "norm_mlp"), ("adaln.modulation", "adaln_modulation"), ("layer.norm", "layer_norm")]:
        module = module.replace(a, b)
    prefix = "diffusion_model." if is_dit else "text_encoders.qwen3_06b.transformer.model."
    return f"{prefix}{module}.{weight}"


def _anima_comfy_sibling(sd: dict, dtype) -> dict:
    """``convert_tlora_state_dict_to_comfy``: ortho modules as a rank-2r LoRA (fp32 alpha 2 alpha),
    kaiming ones passed through cast to ``dtype``; ComfyUI key names."""
    groups = {}
    for k, v in sd.items():
        name, suffix = k.split(".", 1)
        groups.setdefault(name, {})[suffix] = v
    out = {}
    for name, t in groups.items():
        if "q_layer.weight" in t:
            q, p, lam = t["q_layer.weight"].float(), t["p_layer.weight"].float(), t["lambda_layer"].float()
            bq, bp, blam = t["base_q.weight"].float(), t["base_p.weight"].float(), t["base_lambda_buf"].float()
            dt = dtype if dtype is not None else t["q_layer.weight"].dtype
            out[f"{name}.lora_down.weight"] = torch.cat([q, bq], 0).contiguous().to(dt)
            out[f"{name}.lora_up.weight"] = torch.cat([p * lam, -(bp * blam)], 1).contiguous().to(dt)
            alpha = float(t["alpha"].item()) if "alpha" in t else float(q.shape[0])
            out[f"{name}.alpha"] = torch.tensor(2.0 * alpha, dtype=torch.float32)
        else:
            for suffix, v in t.items():
                out[f"{name}.{suffix}"] = v.to(dtype) if dtype is not None and v.dtype.is_floating_point else v
    return {anima_comfy_name(k): v for k, v in out.items()}


def write_anima(model_patcher, path, init: str = "kaiming", rank: int = 8, alpha: float = 4.0, *, min_rank: int = 1,
                alpha_rank_scale: float = 1.0, sig_type: str = "last", dtype=torch.bfloat16, comfy_sibling: bool = True,
                max_timestep: float = 1.0, type_dims: Optional[dict] = None, seed: int = 0) -> Path:
    """A T-LoRA as the Anima kohya fork saves it (``TLoRANetwork.save_weights``): ``lora_unet_<path>``
    of the Linears in the DiT's Block / PatchEmbed / TimestepEmbedding / FinalLayer modules minus its
    exclude pattern (10 per block); ``init`` "kaiming": lora_down / lora_up / alpha, "orthogonal" (QR
    base) or "layer_orthogonal" (the layer's SVD, ``sig_type``): q_layer / p_layer / lambda_layer with
    the frozen base_q / base_p / base_lambda_buf; every tensor cast to ``dtype`` (bf16 alpha too),
    sd-scripts' metadata with the ``ss_tlora_*`` keys; and, as the fork does on every save,
    ``<name>_comfy.safetensors`` (``comfy_sibling``). ``type_dims`` ({"self_attn": 4, "cross_attn": 16,
    "mlp": 2}): the fork's ``self_attn_dim`` / ``cross_attn_dim`` / ``mlp_dim`` network args, a rank of
    their own for those modules."""
    if init not in ("kaiming", "orthogonal", "layer_orthogonal"):
        raise ValueError(f"tlora_init {init!r}")
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    network_dim, sd = rank, {}
    with torch.no_grad():
        for name, lin in sorted(kohya_modules(_dit(model_patcher), "lora_unet", ANIMA_TARGETS, ANIMA_EXCLUDE).items()):
            o, i = lin.weight.shape
            rank = next((d for kind, d in (type_dims or {}).items() if f"_{kind}_" in name), network_dim)
            if init == "kaiming":
                down, up = _trained_plain(_kaiming_down(rank, i, gen), o, gen)
                sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
            else:
                q0, p0, lam0 = (_anima_layer_init(lin.weight, rank, sig_type) if init == "layer_orthogonal"
                                else _anima_orthogonal_init(i, o, rank, sig_type, gen))
                q, p, lam = _trained_ortho(q0, p0, lam0, gen)
                sd.update({f"{name}.q_layer.weight": q, f"{name}.p_layer.weight": p, f"{name}.lambda_layer": lam,
                           f"{name}.base_q.weight": q0, f"{name}.base_p.weight": p0, f"{name}.base_lambda_buf": lam0})
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    if dtype is not None:
        sd = {k: v.detach().clone().contiguous().to(dtype) for k, v in sd.items()}
    net_args = {"tlora_min_rank": str(min_rank), "tlora_alpha_rank_scale": str(alpha_rank_scale), "tlora_init": init}
    net_args.update({f"{kind}_dim": str(d) for kind, d in (type_dims or {}).items()})
    if init != "kaiming":
        net_args["tlora_sig_type"] = sig_type
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "float")
    metadata = {  # train_network.py's metadata (a subset) + anima_train_network.update_metadata, all str()
        "ss_session_id": "1234567890", "ss_training_started_at": "1775000000.0", "ss_output_name": path.stem,
        "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0001", "ss_text_encoder_lr": "None",
        "ss_num_train_images": "20", "ss_num_epochs": "10", "ss_max_train_steps": "2000",
        "ss_network_module": "networks.lora_tlora_anima", "ss_network_dim": str(network_dim), "ss_network_alpha": str(alpha),
        "ss_network_dropout": "None", "ss_mixed_precision": "bf16", "ss_save_precision": precision,
        "ss_base_model_version": "anima", "ss_network_args": json.dumps(net_args),
        "ss_weighting_scheme": "none", "ss_timestep_sampling": "sigmoid", "ss_sigmoid_scale": "1.0",
        "ss_discrete_flow_shift": "1.0", "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "anima-preview/lora", "modelspec.title": path.stem,
    }
    metadata.update({"ss_tlora_min_rank": str(int(min_rank)), "ss_tlora_alpha_rank_scale": str(float(alpha_rank_scale)),
                     "ss_tlora_max_timestep": str(float(max_timestep)), "ss_tlora_init": init,
                     "ss_tlora_sig_type": sig_type})
    metadata = _save_hashed(sd, path, metadata)
    if comfy_sibling and path.suffix == ".safetensors":
        comfy_metadata = {k: v for k, v in metadata.items() if k not in ANIMA_TLORA_KEYS}
        _save_hashed(_anima_comfy_sibling(sd, dtype), anima_comfy_sibling_path(path), comfy_metadata)
    return path


# sd-scripts' SD/SDXL UNet classes the fork's lora_tlora.py targets (its SD 1.x UNet names them and their
# layers as diffusers does, its SDXL UNet as SGM / ComfyUI do), keyed by ComfyUI's class names
SD_FORK_TARGETS = {"SpatialTransformer": "Transformer2DModel", "ResBlock": "ResnetBlock2D",
                   "Downsample": "Downsample2D", "Upsample": "Upsample2D"}


def sd_fork_modules(root: torch.nn.Module, conv_dim: Optional[int]) -> dict:
    """lora name -> layer, as the fork's ``TLoRANetwork.create_modules`` finds them in ``root`` (a
    ComfyUI UNet: SDXL's paths; a diffusers one: SD 1.x's): the Linears and convs of
    Transformer2DModel, and with ``conv_dim`` those of ResnetBlock2D / Downsample2D / Upsample2D too
    (their 3x3 convs take ``conv_dim``)."""
    out = {}
    for name, module in root.named_modules():
        kind = type(module).__name__
        cls = SD_FORK_TARGETS.get(kind, kind if kind in SD_FORK_TARGETS.values() else None)
        if cls is None or (cls != "Transformer2DModel" and conv_dim is None):
            continue
        for child_name, child in module.named_modules():
            if type(child).__name__ in ("Linear", "Conv2d"):
                out[f"lora_unet.{name}.{child_name}".replace(".", "_")] = child
    return out


def write_sd_fork(model_patcher, path, init: str = "kaiming", rank: int = 8, alpha: float = 4.0, *,
                  conv_dim: Optional[int] = None, conv_alpha: Optional[float] = None, min_rank: int = 1,
                  alpha_rank_scale: float = 1.0, dtype=torch.bfloat16, base_model_version: str = "sdxl_base_v1-0",
                  seed: int = 0) -> Path:
    """A T-LoRA as the fork's SD/SDXL network (orangemagic123/sd-scripts ``networks/lora_tlora.py``)
    saves it: ``lora_unet_<path>`` (``sd_fork_modules``); Linears and 1x1 convs at ``rank``, the
    3x3 convs of the ResNet / down / up blocks at ``conv_dim`` (``conv_alpha``). ``init`` "kaiming":
    ``lora_down`` (a conv with the layer's kernel on convs) / ``lora_up`` (1x1 on convs) / ``alpha``;
    "orthogonal": ``OrthogonalTLoRAModule``'s q_layer / p_layer / lambda_layer with the frozen base_q /
    base_p / base_lambda_buf, ``q_layer`` flattened to (R, in * kh * kw) on convs. Every tensor cast to
    ``dtype``; ``ss_tlora_*`` metadata (T = 1000: the scheduler's timestep)."""
    if init not in ("kaiming", "orthogonal"):
        raise ValueError(f"tlora_init {init!r}")
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for name, layer in sorted(sd_fork_modules(_dit(model_patcher), conv_dim).items()):
            w = layer.weight
            o, i, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
            is_3x3 = w.ndim == 4 and kernel != (1, 1)
            r, a = (conv_dim, conv_alpha if conv_alpha is not None else 1.0) if is_3x3 else (rank, alpha)
            flat = i * math.prod(kernel)
            if init == "kaiming":
                down, up = _trained_plain(_kaiming_down(r, flat, gen), o, gen)
                if w.ndim == 4:
                    down, up = down.reshape(r, i, *kernel), up.reshape(o, r, 1, 1)
                sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
            else:
                q0, p0, lam0 = _anima_orthogonal_init(flat, o, r, "last", gen)
                q, p, lam = _trained_ortho(q0, p0, lam0, gen)
                sd.update({f"{name}.q_layer.weight": q, f"{name}.p_layer.weight": p, f"{name}.lambda_layer": lam,
                           f"{name}.base_q.weight": q0, f"{name}.base_p.weight": p0, f"{name}.base_lambda_buf": lam0})
            sd[f"{name}.alpha"] = torch.tensor(float(a))
    if dtype is not None:
        sd = {k: v.detach().clone().contiguous().to(dtype) for k, v in sd.items()}
    net_args = {"tlora_min_rank": str(min_rank), "tlora_alpha_rank_scale": str(alpha_rank_scale), "tlora_init": init}
    if conv_dim is not None:
        net_args.update({"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)})
    metadata = {
        "ss_network_module": "networks.lora_tlora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(net_args), "ss_base_model_version": base_model_version,
        "ss_tlora_min_rank": str(int(min_rank)), "ss_tlora_alpha_rank_scale": str(float(alpha_rank_scale)),
        "ss_tlora_max_timestep": "1000", "ss_tlora_init": init, "ss_tlora_sig_type": "last",
    }
    _save_hashed(sd, path, metadata)
    return path


def anima_comfy_sibling_path(path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_comfy{path.suffix}")


def _takenoko_ortho_init(lin: torch.nn.Linear, r: int, from_layer: bool, sig_type: str, gen):
    """``_enable_orthogonal_parameterization`` for one module: (q, p, lambda), or None where its
    ``copy_`` fails (random init of a non-square layer: the module stays a plain T-LoRA)."""
    o, i = lin.weight.shape
    q, p, lam = torch.empty(r, i), torch.empty(o, r), torch.empty(1, r)
    with one_thread():
        if from_layer:
            u, s, vh = torch.linalg.svd(lin.weight.detach().float(), full_matrices=False)
            if sig_type == "principal":
                src = (vh[:r, :], u[:, :r], s[:r])
            elif sig_type == "middle":
                su, sv, ss = (max(0, (n - r) // 2) for n in (u.shape[1], vh.shape[0], s.shape[0]))
                src = (vh[sv:sv + r, :], u[:, su:su + r], s[ss:ss + r])
            else:
                src = (vh[-r:, :], u[:, -r:], s[-r:])
        else:
            base_m = torch.normal(0.0, 1.0 / max(1, r), size=(i, o), generator=gen)
            u, s, vh = torch.linalg.svd(base_m, full_matrices=False)
            if sig_type == "principal":
                src = (u[:r, :], vh[:, :r], s[:r])
            elif sig_type == "middle":
                su, sv, ss = (max(0, (n - r) // 2) for n in (u.shape[0], vh.shape[1], s.shape[0]))
                src = (u[su:su + r, :], vh[:, sv:sv + r], s[ss:ss + r])
            else:
                src = (u[-r:, :], vh[:, -r:], s[-r:])
    try:
        q.copy_(src[0])
        p.copy_(src[1])
        lam.copy_(src[2].unsqueeze(0))
    except RuntimeError:  # takenoko: `except Exception: continue`
        return None
    return q, p, lam


def takenoko_config(rank: int, alpha: float, trainer_type: str, ortho_from_layer: bool, boundary, min_rank,
                    tlora_alpha, sig_type: str = "last", target_model: str = "wan21") -> str:
    """The training TOML takenoko embeds verbatim (``takenoko_config_content``)."""
    args = [f"tlora_trainer_type={trainer_type}", f"tlora_min_rank={min_rank}", f"tlora_alpha={tlora_alpha}",
            f"tlora_boundary_timestep={boundary}"]
    if trainer_type == "ortho_lora":
        args += [f"sig_type={sig_type}", f"ortho_from_layer={'true' if ortho_from_layer else 'false'}",
                 "ortho_reg_lambda_p=1e-3", "ortho_reg_lambda_q=1e-3"]
    lines = "\n".join(f'  "{a}",' for a in args)
    return (f"# Takenoko configuration\n\n# \"wan21\" or \"wan22\"\ntarget_model = \"{target_model}\"\n\n"
            "dit = \"models/wan2.1_t2v_1.3B_bf16.safetensors\"\nvae = \"models/wan_2.1_vae.safetensors\"\n"
            "mixed_precision = \"bf16\"\ntimestep_sampling = \"shift\"\ndiscrete_flow_shift = 3.0\n\n"
            "# T-LoRA (timestep-gated LoRA)\nnetwork_module = \"networks.t_lora\"\n"
            f"network_dim = {rank}\nnetwork_alpha = {float(alpha)}\nnetwork_args = [\n{lines}\n]\n\n"
            "learning_rate = 1e-4\nmax_train_steps = 2000\noutput_name = \"t_lora\"\n")


def write_takenoko(model_patcher, path, trainer_type: str = "lora", ortho_from_layer: bool = False, boundary=875,
                   min_rank: int = 1, tlora_alpha: float = 1.0, rank: int = 8, alpha: float = 4.0, *,
                   dtype=torch.bfloat16, embed_config: bool = True, sig_type: str = "last", seed: int = 0) -> Path:
    """A T-LoRA as takenoko saves one (``LoRANetwork.save_weights`` with ``save_dtype`` = the DiT's):
    ``t_lora_unet_<path>`` of the Linears in each WanAttentionBlock; plain lora_down / lora_up / alpha,
    or (``trainer_type`` "ortho_lora") q_layer / p_layer / lambda_layer + base_q / base_p / base_lambda
    beside the unused (frozen kaiming / zero) lora_down / lora_up: with the random init
    (``ortho_from_layer`` False) the non-square ffn layers fail its ``copy_`` and stay plain, so the
    file mixes both; every tensor cast to ``dtype``. Metadata: takenoko_* keys and, with
    ``embed_config``, the training TOML with its ``network_args`` in ``takenoko_config_content``."""
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for name, lin in sorted(kohya_modules(_dit(model_patcher), "t_lora_unet", TAKENOKO_TARGETS).items()):
            o, i = lin.weight.shape
            down = _kaiming_down(rank, i, gen)
            ortho = (_takenoko_ortho_init(lin, rank, ortho_from_layer, sig_type, gen) if trainer_type == "ortho_lora"
                     else None)
            if ortho is None:
                down, up = _trained_plain(down, o, gen)
            else:
                q0, p0, lam0 = ortho
                q, p, lam = _trained_ortho(q0, p0, lam0, gen)
                up = torch.zeros(o, rank)  # frozen, never used in the forward
                sd.update({f"{name}.q_layer.weight": q, f"{name}.p_layer.weight": p, f"{name}.lambda_layer": lam,
                           f"{name}.base_q.weight": q0.clone(), f"{name}.base_p.weight": p0.clone(),
                           f"{name}.base_lambda": lam0.clone()})
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(alpha)})
    if dtype is not None:
        sd = {k: v.detach().clone().contiguous().to(dtype) for k, v in sd.items()}
    metadata = {  # TrainerConfig.create_training_metadata (a subset), all str()
        "takenoko_session_id": "1234567890", "takenoko_training_started_at": "1775000000.0",
        "takenoko_output_name": path.stem, "takenoko_learning_rate": "0.0001", "takenoko_num_epochs": "10",
        "takenoko_max_train_steps": "2000", "takenoko_base_model_version": "wan21",
        "takenoko_network_module": "networks.t_lora", "takenoko_network_dim": str(rank),
        "takenoko_network_alpha": str(float(alpha)), "takenoko_network_dropout": "None",
        "takenoko_mixed_precision": "bf16", "takenoko_seed": "42", "takenoko_training_comment": "None",
        "takenoko_optimizer": "torch.optim.adamw.AdamW", "takenoko_max_grad_norm": "1.0",
        "takenoko_dit_name": "wan2.1_t2v_1.3B_bf16.safetensors", "takenoko_vae_name": "wan_2.1_vae.safetensors",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "wan2.1/lora",
        "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1", "modelspec.title": path.stem,
    }
    if embed_config:
        metadata["takenoko_config_content"] = takenoko_config(rank, alpha, trainer_type, ortho_from_layer, boundary,
                                                              min_rank, tlora_alpha, sig_type)
        metadata["takenoko_config_file"] = "t_lora.toml"
    _save_hashed(sd, path, metadata)
    return path


def write_fizgig(model_patcher, path, min_rank: int = 1, rank: int = 8, alpha: float = 8.0, *,
                 dtype=torch.bfloat16, raw: bool = False, seed: int = 0) -> Path:
    """A T-LoRA as Fizgig's Krea 2 trainer saves one (``_save_lora`` -> ``_save_exportable``, kind
    "tlora"): ``lora_unet_<path>`` lora_down / lora_up / alpha of every Linear of the DiT ("all-Linear"),
    the raw state dict cast to ``dtype``, ss_adapter "tlora", ss_architecture "krea2",
    ss_tlora_min_rank (as requested), ss_tlora_max_timestep "1000", ss_adapter_weights."""
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for name, lin in sorted(kohya_modules(_dit(model_patcher), "lora_unet").items()):
            o, i = lin.weight.shape
            down, up = _trained_plain(_kaiming_down(rank, i, gen), o, gen)
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(float(alpha))})
    metadata = {"ss_network_module": "fizgig.krea2 (tlora, all-Linear)", "ss_adapter": "tlora",
                "ss_network_dim": str(rank), "ss_architecture": "krea2", "ss_network_alpha": str(alpha),
                "ss_tlora_min_rank": str(min_rank), "ss_tlora_max_timestep": "1000",
                "ss_adapter_weights": "raw (resume state)" if raw else FIZGIG_ADAPTER_WEIGHTS}
    if dtype is not None:
        sd = {k: v.contiguous().to(dtype) for k, v in sd.items()}
    _save_hashed(sd, path, metadata)
    return path


def write_lycoris_rank2r_export(model_patcher, path, rank: int = 4, alpha: float = 2.0, *,
                                metadata: Optional[str] = "sd-scripts", modules: Optional[Iterable[str]] = None,
                                prefix: str = "lora_unet", min_rank: int = 1, tlora_alpha: float = 1.0,
                                dtype=torch.float32, seed: int = 0) -> Path:
    """A LyCORIS T-LoRA saved by PR #280's ``custom_state_dict`` (or its ``tools/convert_tlora.py``):
    plain ``<prefix>_<path>`` lora_up = [P diag(lambda), -P0 diag(lambda0)], lora_down = [Q; Q0], alpha
    = 2 alpha, the base the layer's principal SVD (LyCORIS' data init). ``metadata``: "sd-scripts"
    (ss_network_module lycoris.kohya + ss_network_args with "algo": "tlora"), "simpletuner"
    (``lycoris_config``), or None (``tools/convert_tlora.py``: no metadata, alpha kept in fp32)."""
    from safetensors.torch import save_file

    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    dm = _dit(model_patcher)
    dm_sd = dm.state_dict()
    sd = {}
    default = sorted(k[: -len(".weight")] for k, v in dm_sd.items()
                     if k.endswith(".weight") and v.ndim == 2 and any(c in k for c in ("attn", "mlp", "ffn", "proj")))
    for m in modules if modules is not None else default:
        w = dm_sd[m + ".weight"]
        q0, p0, lam0 = _anima_layer_init(w, rank, "principal")
        q, p, lam = _trained_ortho(q0, p0, lam0, gen)
        name = f"{prefix}_{m.replace('.', '_')}"
        sd[name + ".lora_up.weight"] = torch.cat([p * lam, -(p0 * lam0)], 1).contiguous()
        sd[name + ".lora_down.weight"] = torch.cat([q, q0], 0).contiguous()
        sd[name + ".alpha"] = torch.tensor(float(alpha)) * 2
    # save_weights casts every tensor; convert_tlora.py (no metadata) keeps alpha in fp32
    sd = {k: v.to(torch.float32 if metadata is None and k.endswith(".alpha") else dtype) for k, v in sd.items()}
    cfg = {"algo": "tlora", "linear_dim": rank, "linear_alpha": alpha, "tlora_min_rank": min_rank,
           "tlora_alpha": tlora_alpha}
    meta = None
    if metadata == "sd-scripts":
        meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                "ss_network_args": json.dumps({k: str(v) for k, v in cfg.items()
                                               if k not in ("linear_dim", "linear_alpha")})}
    elif metadata == "simpletuner":
        meta = {"lycoris_config": json.dumps(cfg)}
    elif metadata is not None:
        raise ValueError(f"metadata {metadata!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), meta)
    return path
