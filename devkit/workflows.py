"""The example workflows: built from a running server's ``/object_info``, checked against it, and
given thumbnails rendered by ComfyUI's own frontend.

    python -m devkit.workflows          # rewrite example_workflows/*.json (+ .jpg thumbnails)

``validate_workflow`` is what the tests use: node types exist, widget values fit their inputs
(combos other than model file names included), links join an existing output to an existing
input of the same type, and every required socket is connected.

One file serves every ComfyUI host the pack supports. Hosts differ in slot lists that a workflow
does not depend on: ComfyUI 0.28 gave SaveImage, SaveAnimatedWEBP and PreviewAny an output, and a
host or pack version may add an optional widget. So the builder leaves out the unlinked trailing
outputs of output nodes (the frontend adds them from the node definition), the validator accepts a
node without them and without trailing optional widget values (the frontend uses their defaults),
and ``essentials`` reads a workflow as what it means (node types, widget values by input name,
links between named sockets) for comparisons that hold on every host.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from .host import ROOT

EXAMPLES = ROOT / "example_workflows"
# Frontend-only node types (no Python class on the server).
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
MODE_BYPASS = 4


# --- object_info helpers -----------------------------------------------------------------------
def _inputs(node_def: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) in the frontend's order (input_order: required, optional)."""
    out = []
    for section in ("required", "optional"):
        specs = node_def["input"].get(section, {})
        order = node_def.get("input_order", {}).get(section, list(specs))
        for name in order:
            spec = specs[name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(typ, list):  # V1 combo: the options list is the type
                typ, opts = "COMBO", dict(opts, options=typ)
            out.append((name, typ, opts, section == "required"))
    return out


def _widget_slots(node_def: dict) -> list[tuple[str, str, dict, bool]]:
    """(input name, type, options, required) per entry of ``widgets_values``."""
    slots = []
    for name, typ, opts, required in _inputs(node_def):
        if typ in WIDGET_TYPES and not opts.get("forceInput"):
            slots.append((name, typ, opts, required))
            if opts.get("control_after_generate"):
                slots.append((f"{name}:control", "CONTROL", {}, required))
    return slots


def widget_slots(node_def: dict) -> list[tuple[str, str, dict]]:
    """The entries of ``widgets_values``: (input name, type, options); seed controls as ``<name>:control``."""
    return [(name, typ, opts) for name, typ, opts, _ in _widget_slots(node_def)]


def widget_default(typ: str, opts: dict):
    """The value a widget gets when nothing sets it (the frontend's rule: a combo's first option)."""
    if typ == "CONTROL":
        return "fixed"
    value = opts.get("default")
    if value is None and typ == "COMBO" and opts.get("options"):
        value = opts["options"][0]
    return value


def widget_values(node: dict, node_def: dict) -> dict:
    """A node's ``widgets_values`` by input name. Trailing optional widgets the workflow has no value
    for get their defaults, as in the frontend; values beyond the node's widgets appear as ``#<index>``."""
    slots, values = _widget_slots(node_def), node.get("widgets_values") or []
    named = {}
    for i, (name, typ, opts, _) in enumerate(slots):
        named[name] = values[i] if i < len(values) else widget_default(typ, opts)
    named.update({f"#{i}": values[i] for i in range(len(slots), len(values))})
    return named


def socket_inputs(node_def: dict) -> list[tuple[str, str, bool]]:
    return [(n, t, req) for n, t, o, req in _inputs(node_def) if t not in WIDGET_TYPES or o.get("forceInput")]


FILE_INPUT = re.compile(r"^(ckpt|lora|unet|vae|clip|model|control_net|style_model|upscale_model|gligen)_name\d*$")


def check_value(name: str, typ: str, opts: dict, value) -> str | None:
    """Why ``value`` does not fit the widget, or None."""
    if typ == "CONTROL":
        return None if value in CONTROL_VALUES else f"{name}: {value!r} is not a seed control"
    if typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: {value!r} is not a boolean"
    if typ == "STRING":
        return None if isinstance(value, str) else f"{name}: {value!r} is not a string"
    if typ in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name}: {value!r} is not a number"
        if typ == "INT" and value != int(value):
            return f"{name}: {value!r} is not an integer"
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{name}: {value} is outside [{lo}, {hi}]"
        return None
    if typ == "COMBO":
        options = opts.get("options", [])
        if value in options:
            return None
        if isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES) and FILE_INPUT.match(name):
            return None  # a model file the user provides (the test server has none)
        return f"{name}: {value!r} is not one of {options[:8]}{'...' if len(options) > 8 else ''}"
    return f"{name}: unknown widget type {typ}"


def validate_workflow(wf: dict, object_info: dict) -> list[str]:
    """Everything in a UI-format workflow that the server or the frontend would not accept."""
    problems = []
    nodes = {n["id"]: n for n in wf["nodes"]}
    if len(nodes) != len(wf["nodes"]):
        problems.append("duplicate node ids")
    links = {}
    for link in wf.get("links", []):
        lid, src, src_slot, dst, dst_slot, typ = link
        links[lid] = link
        s, d = nodes.get(src), nodes.get(dst)
        if s is None or d is None:
            problems.append(f"link {lid}: node {src if s is None else dst} does not exist")
            continue
        outs, ins = s.get("outputs", []), d.get("inputs", [])
        if src_slot >= len(outs) or dst_slot >= len(ins):
            problems.append(f"link {lid}: slot out of range")
            continue
        out, inp = outs[src_slot], ins[dst_slot]
        if lid not in (out.get("links") or []) or inp.get("link") != lid:
            problems.append(f"link {lid}: not recorded on both ends")
        if s["type"] in object_info and src_slot < len(object_info[s["type"]]["output"]):
            real = object_info[s["type"]]["output"][src_slot]
            if out["type"] != real or typ != real:
                problems.append(f"link {lid}: {s['type']} output {src_slot} is {real}, workflow says {out['type']}/{typ}")
        if d["type"] in object_info:
            spec = {n: t for n, t, _, _ in _inputs(object_info[d["type"]])}
            if inp["name"] not in spec:
                problems.append(f"link {lid}: {d['type']} has no input {inp['name']!r}")
            elif spec[inp["name"]] not in (typ, "*") and typ != "*":
                problems.append(f"link {lid}: {d['type']}.{inp['name']} takes {spec[inp['name']]}, gets {typ}")
    for node in wf["nodes"]:
        t = node["type"]
        if t in VIRTUAL:
            continue
        if t not in object_info:
            problems.append(f"node {node['id']}: unknown type {t}")
            continue
        nd = object_info[t]
        slots = _widget_slots(nd)
        values = node.get("widgets_values") or []
        missing = slots[len(values):]
        if len(values) > len(slots) or any(required for *_, required in missing):
            problems.append(f"node {node['id']} ({t}): {len(values)} widget values for {len(slots)} widgets {[s[0] for s in slots]}")
        else:  # trailing optional widgets without a value take their defaults, in the frontend too
            for (name, typ, opts, _), value in zip(slots, values):
                why = check_value(name, typ, opts, value)
                if why:
                    problems.append(f"node {node['id']} ({t}): {why}")
        outs = node.get("outputs", [])
        # an output node may leave out trailing outputs (hosts differ there; the frontend adds them)
        if len(outs) > len(nd["output"]) or (len(outs) < len(nd["output"]) and not nd.get("output_node")):
            problems.append(f"node {node['id']} ({t}): {len(outs)} outputs, server has {len(nd['output'])}")
        for slot, (out, real) in enumerate(zip(outs, nd["output"])):
            if out.get("type") != real:
                problems.append(f"node {node['id']} ({t}): output {slot} is {real}, workflow says {out.get('type')}")
        connected = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, typ, required in socket_inputs(nd):
            if required and name not in connected and node.get("mode", 0) != MODE_BYPASS:
                problems.append(f"node {node['id']} ({t}): required input {name} ({typ}) is not connected")
        for i in node.get("inputs", []):
            if i.get("link") is not None and i["link"] not in links:
                problems.append(f"node {node['id']} ({t}): input {i['name']} names missing link {i['link']}")
    return problems


def essentials(wf: dict, object_info: dict) -> dict:
    """What a workflow means, the same on every host: per node its type, title, mode, place and widget
    values by input name (notes: their text), and the links as (source node, output name, target
    node, input name, type). Slot lists and slot indices are left out."""
    nodes = {}
    for n in wf["nodes"]:
        entry = {"type": n["type"], "title": n.get("title"), "mode": n.get("mode", 0),
                 "pos": list(n.get("pos", [])), "size": list(n.get("size", []))}
        if n["type"] in object_info:
            entry["values"] = widget_values(n, object_info[n["type"]])
        else:
            entry["values"] = list(n.get("widgets_values") or [])
        nodes[n["id"]] = entry
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = []
    for lid, src, src_slot, dst, dst_slot, typ in wf.get("links", []):
        out = by_id[src]["outputs"][src_slot]["name"] if src in by_id else None
        inp = by_id[dst]["inputs"][dst_slot]["name"] if dst in by_id else None
        links.append([src, out, dst, inp, typ])
    return {"nodes": nodes, "links": sorted(links, key=json.dumps), "groups": wf.get("groups", [])}


# --- building -----------------------------------------------------------------------------------
class Workflow:
    def __init__(self, object_info: dict):
        self.oi = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, type_: str, pos, size=(315, 120), title: str | None = None, mode: int = 0, **values) -> dict:
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": mode, "properties": {"Node name for S&R": type_}}
        if type_ in VIRTUAL:
            node.update(inputs=[], outputs=[], widgets_values=[values.pop("text")], properties={})
            node["color"], node["bgcolor"] = "#432", "#653"
        else:
            nd = self.oi[type_]
            wv = []
            for name, typ, opts in widget_slots(nd):
                if name.endswith(":control"):
                    wv.append(values.pop(name.replace(":control", "_control"), "fixed"))
                    continue
                wv.append(values.pop(name, widget_default(typ, opts)))
            node["inputs"] = [{"name": n, "type": t, "link": None} for n, t, _ in socket_inputs(nd)]
            node["outputs"] = [{"name": nm, "type": t, "links": [], "slot_index": i}
                               for i, (nm, t) in enumerate(zip(nd["output_name"], nd["output"]))]
            node["widgets_values"] = wv
        if values:
            raise ValueError(f"{type_}: unknown inputs {sorted(values)}")
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=(360, 200)) -> dict:
        return self.add("MarkdownNote", pos, size, text=text)

    def link(self, src: dict, out, dst: dict, input_name: str) -> None:
        slot = out if isinstance(out, int) else [o["name"] for o in src["outputs"]].index(out)
        typ = src["outputs"][slot]["type"]
        dslot = [i["name"] for i in dst["inputs"]].index(input_name)
        lid = len(self.links) + 1
        self.links.append([lid, src["id"], slot, dst["id"], dslot, typ])
        src["outputs"][slot]["links"].append(lid)
        dst["inputs"][dslot]["link"] = lid

    def group(self, title: str, bounding, color: str = "#3f789e") -> None:
        self.groups.append({"title": title, "bounding": list(bounding), "color": color, "font_size": 24, "flags": {}})

    def to_json(self) -> dict:
        nodes = []
        for node in self.nodes:
            node = dict(node)
            if self.oi.get(node["type"], {}).get("output_node"):
                # Unlinked trailing outputs of output nodes are left out: hosts differ there (0.28's
                # SaveImage and PreviewAny have one, 0.3.75's none) and the frontend adds them on load.
                outs = node["outputs"]
                while outs and not outs[-1]["links"]:
                    outs = outs[:-1]
                node["outputs"] = outs
            nodes.append(node)
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.7, "offset": [40, 60]}}, "version": 0.4}


SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SDXL_TLORA = "my_sdxl_tlora.safetensors"
FLUX_TLORA = "my_flux_tlora.safetensors"

LOADER_NOTE = (
    "Put your T-LoRA in `ComfyUI/models/loras/` and pick it in **T-LoRA Loader**. It is detected "
    "(LyCORIS/SimpleTuner, the official code, the standalone Flux trainer, kohya-style) and applied with its "
    "training schedule: few ranks at high noise, all ranks near the clean image.\n\n"
    "**T-LoRA Schedule Preview** charts the active rank at every step of this sampler run; the loader's "
    "`info` output says which schedule is in effect and where each value came from."
)


def sdxl_txt2img(oi: dict) -> dict:
    w = Workflow(oi)
    ckpt = w.add("CheckpointLoaderSimple", (20, 200), (330, 100), ckpt_name=SDXL_CKPT)
    lora = w.add("TLoraLoader", (400, 60), (330, 180), lora_name=SDXL_TLORA, strength_model=1.0)
    pos = w.add("CLIPTextEncode", (400, 300), (420, 160), title="Positive", text="a photo of sks dog on a beach at golden hour, detailed fur")
    neg = w.add("CLIPTextEncode", (400, 500), (420, 130), title="Negative", text="blurry, low quality, watermark")
    lat = w.add("EmptyLatentImage", (400, 670), (330, 110), width=1024, height=1024, batch_size=1)
    ks = w.add("KSampler", (880, 60), (320, 270), seed=42, steps=30, cfg=6.0, sampler_name="euler", scheduler="normal")
    dec = w.add("VAEDecode", (1240, 60), (200, 50))
    save = w.add("SaveImage", (1240, 150), (500, 520), filename_prefix="tlora_sdxl")
    prev = w.add("TLoraSchedulePreview", (880, 400), (320, 180), sampler_name="euler", scheduler="normal", steps=30)
    info = w.add("PreviewAny", (20, 360), (330, 250), title="T-LoRA info")
    w.note(LOADER_NOTE, (20, 650), (340, 260))
    w.link(ckpt, "MODEL", lora, "model")
    w.link(ckpt, "CLIP", pos, "clip")
    w.link(ckpt, "CLIP", neg, "clip")
    w.link(lora, 0, ks, "model")
    w.link(pos, 0, ks, "positive")
    w.link(neg, 0, ks, "negative")
    w.link(lat, 0, ks, "latent_image")
    w.link(ks, 0, dec, "samples")
    w.link(ckpt, "VAE", dec, "vae")
    w.link(dec, 0, save, "images")
    w.link(lora, 0, prev, "model")
    w.link(lora, 1, info, "source")
    return w.to_json()


def flux_txt2img(oi: dict) -> dict:
    w = Workflow(oi)
    unet = w.add("UNETLoader", (20, 60), (330, 90), unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = w.add("DualCLIPLoader", (20, 200), (330, 130), clip_name1="clip_l.safetensors",
                 clip_name2="t5xxl_fp16.safetensors", type="flux")
    vae = w.add("VAELoader", (20, 380), (330, 60), vae_name="ae.safetensors")
    sch = w.add("TLoraSchedule", (20, 480), (330, 420), mode=MODE_BYPASS)
    lora = w.add("TLoraLoader", (400, 60), (330, 180), lora_name=FLUX_TLORA, strength_model=1.0)
    pos = w.add("CLIPTextEncode", (400, 300), (420, 160), title="Prompt", text="a photo of sks dog wearing a red scarf in the snow")
    guid = w.add("FluxGuidance", (400, 510), (320, 60), guidance=3.5)
    zero = w.add("ConditioningZeroOut", (400, 620), (320, 30))
    lat = w.add("EmptySD3LatentImage", (400, 700), (320, 110), width=1024, height=1024, batch_size=1)
    ks = w.add("KSampler", (880, 60), (320, 270), seed=42, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple")
    dec = w.add("VAEDecode", (1240, 60), (200, 50))
    save = w.add("SaveImage", (1240, 150), (500, 520), filename_prefix="tlora_flux")
    prev = w.add("TLoraSchedulePreview", (880, 400), (320, 180), sampler_name="euler", scheduler="simple", steps=20)
    info = w.add("PreviewAny", (880, 640), (320, 220), title="T-LoRA info")
    w.note("**T-LoRA Schedule** is bypassed: the loader uses the training settings stored with the file. "
           "Un-bypass it (select, Ctrl+B) to override them; its curve shows the active rank against the noise "
           "level as you edit. `max_rank` 0 keeps the file's rank.\n\nFlux runs at cfg 1.0 with FluxGuidance; "
           "T-LoRA reads Flux's noise level as t = 1000 * sigma, like the trainers.", (20, 950), (340, 220))
    w.link(unet, 0, lora, "model")
    w.link(sch, 0, lora, "schedule")
    w.link(clip, 0, pos, "clip")
    w.link(pos, 0, guid, "conditioning")
    w.link(pos, 0, zero, "conditioning")
    w.link(lora, 0, ks, "model")
    w.link(guid, 0, ks, "positive")
    w.link(zero, 0, ks, "negative")
    w.link(lat, 0, ks, "latent_image")
    w.link(ks, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    w.link(dec, 0, save, "images")
    w.link(lora, 0, prev, "model")
    w.link(lora, 1, info, "source")
    return w.to_json()


def tlora_vs_plain(oi: dict) -> dict:
    w = Workflow(oi)
    ckpt = w.add("CheckpointLoaderSimple", (20, 250), (330, 100), ckpt_name=SDXL_CKPT)
    tl = w.add("TLoraLoader", (400, 40), (330, 180), lora_name=SDXL_TLORA, strength_model=1.0)
    pl = w.add("LoraLoaderModelOnly", (400, 630), (330, 90), title="Plain LoRA (all ranks, every step)",
               lora_name=SDXL_TLORA, strength_model=1.0)
    pos = w.add("CLIPTextEncode", (400, 270), (420, 150), title="Positive", text="a photo of sks dog in a garden, soft light")
    neg = w.add("CLIPTextEncode", (400, 460), (420, 120), title="Negative", text="blurry, low quality")
    lat = w.add("EmptyLatentImage", (20, 420), (330, 110), width=1024, height=1024, batch_size=1)
    ka = w.add("KSampler", (880, 40), (320, 270), title="KSampler (T-LoRA)", seed=7, steps=30, cfg=6.0,
               sampler_name="euler", scheduler="normal")
    kb = w.add("KSampler", (880, 360), (320, 270), title="KSampler (plain LoRA)", seed=7, steps=30, cfg=6.0,
               sampler_name="euler", scheduler="normal")
    da = w.add("VAEDecode", (1240, 40), (200, 50))
    db = w.add("VAEDecode", (1240, 360), (200, 50))
    st = w.add("ImageStitch", (1240, 460), (270, 160), direction="right", match_image_size=True, spacing_width=16,
               spacing_color="white")
    save = w.add("SaveImage", (1540, 40), (560, 420), filename_prefix="tlora_vs_plain")
    w.note("Same model, file, prompt and seed. **Left:** T-LoRA Loader, the rank mask follows the noise level as in "
           "training. **Right:** ComfyUI's plain LoRA loader applies every rank at every step, which is what gives "
           "T-LoRAs burnt, over-saturated images.\n\nThe plain loader reads kohya-style and diffusers-named files; "
           "LyCORIS `tlora` keys (SimpleTuner) are not a format it knows, and it skips them (console: "
           "`lora key not loaded`).", (20, 600), (340, 270))
    w.link(ckpt, "MODEL", tl, "model")
    w.link(ckpt, "MODEL", pl, "model")
    w.link(ckpt, "CLIP", pos, "clip")
    w.link(ckpt, "CLIP", neg, "clip")
    for model, ks, dec in ((tl, ka, da), (pl, kb, db)):
        w.link(model, 0, ks, "model")
        w.link(pos, 0, ks, "positive")
        w.link(neg, 0, ks, "negative")
        w.link(lat, 0, ks, "latent_image")
        w.link(ks, 0, dec, "samples")
        w.link(ckpt, "VAE", dec, "vae")
    w.link(da, 0, st, "image1")
    w.link(db, 0, st, "image2")
    w.link(st, 0, save, "images")
    return w.to_json()


# The official ComfyUI examples' file names (https://docs.comfy.org, the workflow templates).
FLUX2_KLEIN = {"unet": "flux-2-klein-4b.safetensors", "clip": "qwen_3_4b.safetensors", "vae": "flux2-vae.safetensors"}
QWEN_IMAGE = {"unet": "qwen_image_fp8_e4m3fn.safetensors", "clip": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
              "vae": "qwen_image_vae.safetensors"}
WAN_T2V = {"unet": "wan2.1_t2v_1.3B_fp16.safetensors", "clip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
           "vae": "wan_2.1_vae.safetensors"}
FLUX2_TLORA = "my_flux2_klein_tlora.safetensors"
QWEN_TLORA = "my_qwen_image_tlora.safetensors"
WAN_TLORA = "my_wan_tlora.safetensors"


def family_note(files: dict, tlora: str, family: str, extra: str = "") -> str:
    """Where the files go, and which schedule applies (the file's, unless the Schedule node is connected)."""
    return (
        f"**{family} + T-LoRA.** Put the files where ComfyUI looks for them:\n\n"
        f"- `models/diffusion_models/{files['unet']}`\n"
        f"- `models/text_encoders/{files['clip']}`\n"
        f"- `models/vae/{files['vae']}`\n"
        f"- your T-LoRA: `models/loras/` (here `{tlora}`; pick yours in **T-LoRA Loader**)\n\n"
        "The T-LoRA Loader applies the file with the training settings stored in it. The **T-LoRA Schedule** "
        "node overrides them only when it is connected to the loader's `schedule` input and enabled: it is "
        "wired here but bypassed (select it, Ctrl+B). The loader's `info` says which schedule is in effect."
        + (f"\n\n{extra}" if extra else "")
    )


def flux2_klein_txt2img(oi: dict) -> dict:
    """Flux.2 Klein 4B (distilled) text-to-image as ComfyUI's template runs it: Flux2Scheduler, CFGGuider
    at cfg 1, SamplerCustomAdvanced, 4 steps."""
    f = FLUX2_KLEIN
    w = Workflow(oi)
    unet = w.add("UNETLoader", (20, 60), (330, 90), unet_name=f["unet"], weight_dtype="default")
    clip = w.add("CLIPLoader", (20, 200), (330, 110), clip_name=f["clip"], type="flux2")
    vae = w.add("VAELoader", (20, 360), (330, 60), vae_name=f["vae"])
    sch = w.add("TLoraSchedule", (20, 470), (330, 420), mode=MODE_BYPASS)
    lora = w.add("TLoraLoader", (400, 60), (330, 180), lora_name=FLUX2_TLORA, strength_model=1.0)
    pos = w.add("CLIPTextEncode", (400, 290), (420, 160), title="Prompt",
                text="a photo of sks dog wearing a red scarf in the snow")
    zero = w.add("ConditioningZeroOut", (400, 500), (320, 30), title="Negative (empty)")
    lat = w.add("EmptyFlux2LatentImage", (400, 580), (320, 110), width=1024, height=1024, batch_size=1)
    guider = w.add("CFGGuider", (880, 60), (320, 100), cfg=1.0)
    noise = w.add("RandomNoise", (880, 210), (320, 90), noise_seed=42)
    sampler = w.add("KSamplerSelect", (880, 350), (320, 60), sampler_name="euler")
    sigmas = w.add("Flux2Scheduler", (880, 460), (320, 110), steps=4, width=1024, height=1024)
    info = w.add("PreviewAny", (880, 620), (320, 240), title="T-LoRA info")
    sca = w.add("SamplerCustomAdvanced", (1240, 60), (270, 130))
    dec = w.add("VAEDecode", (1240, 240), (200, 50))
    save = w.add("SaveImage", (1550, 60), (500, 520), filename_prefix="tlora_flux2_klein")
    w.note(family_note(f, FLUX2_TLORA, "Flux.2 Klein 4B",
                       "The distilled Klein runs 4 steps at cfg 1 (the base model: `flux-2-klein-base-4b`, "
                       "about 20 steps at cfg 5, with a negative prompt)."), (20, 940), (420, 330))
    w.link(unet, 0, lora, "model")
    w.link(sch, 0, lora, "schedule")
    w.link(clip, 0, pos, "clip")
    w.link(pos, 0, zero, "conditioning")
    w.link(lora, 0, guider, "model")
    w.link(pos, 0, guider, "positive")
    w.link(zero, 0, guider, "negative")
    w.link(noise, 0, sca, "noise")
    w.link(guider, 0, sca, "guider")
    w.link(sampler, 0, sca, "sampler")
    w.link(sigmas, 0, sca, "sigmas")
    w.link(lat, 0, sca, "latent_image")
    w.link(sca, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    w.link(dec, 0, save, "images")
    w.link(lora, 1, info, "source")
    return w.to_json()


def _ksampler_family(oi: dict, files: dict, tlora: str, clip_type: str, shift_node: str, shift: float,
                     latent: tuple, sampler: dict, save: tuple, prompt: str, negative: str, family: str,
                     extra: str) -> dict:
    """UNETLoader -> model-sampling shift -> T-LoRA Loader -> KSampler, as ComfyUI's examples for the
    model run it, with the T-LoRA Schedule (bypassed), the schedule preview and the loader's info."""
    w = Workflow(oi)
    unet = w.add("UNETLoader", (20, 60), (330, 90), unet_name=files["unet"], weight_dtype="default")
    clip = w.add("CLIPLoader", (20, 200), (330, 110), clip_name=files["clip"], type=clip_type)
    vae = w.add("VAELoader", (20, 360), (330, 60), vae_name=files["vae"])
    sch = w.add("TLoraSchedule", (20, 470), (330, 420), mode=MODE_BYPASS)
    ms = w.add(shift_node, (400, 60), (330, 60), shift=shift)
    lora = w.add("TLoraLoader", (400, 170), (330, 180), lora_name=tlora, strength_model=1.0)
    pos = w.add("CLIPTextEncode", (400, 400), (420, 160), title="Positive", text=prompt)
    neg = w.add("CLIPTextEncode", (400, 610), (420, 120), title="Negative", text=negative)
    lat_type, lat_values = latent
    lat = w.add(lat_type, (400, 780), (320, 130), **lat_values)
    ks = w.add("KSampler", (880, 60), (320, 270), seed=42, **sampler)
    prev = w.add("TLoraSchedulePreview", (880, 380), (320, 180), sampler_name=sampler["sampler_name"],
                 scheduler=sampler["scheduler"], steps=sampler["steps"])
    info = w.add("PreviewAny", (880, 610), (320, 240), title="T-LoRA info")
    dec = w.add("VAEDecode", (1240, 60), (200, 50))
    save_type, save_values = save
    out = w.add(save_type, (1240, 160), (500, 520), **save_values)
    w.note(family_note(files, tlora, family, extra), (20, 940), (420, 330))
    w.link(unet, 0, ms, "model")
    w.link(ms, 0, lora, "model")
    w.link(sch, 0, lora, "schedule")
    w.link(clip, 0, pos, "clip")
    w.link(clip, 0, neg, "clip")
    w.link(lora, 0, ks, "model")
    w.link(pos, 0, ks, "positive")
    w.link(neg, 0, ks, "negative")
    w.link(lat, 0, ks, "latent_image")
    w.link(ks, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    w.link(dec, 0, out, "images")
    w.link(lora, 0, prev, "model")
    w.link(lora, 1, info, "source")
    return w.to_json()


def qwen_image_txt2img(oi: dict) -> dict:
    """Qwen-Image text-to-image as ComfyUI's example runs it (AuraFlow shift 3.1, 1328x1328, 20 steps)."""
    return _ksampler_family(
        oi, QWEN_IMAGE, QWEN_TLORA, "qwen_image", "ModelSamplingAuraFlow", 3.1,
        ("EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1}),
        {"steps": 20, "cfg": 2.5, "sampler_name": "euler", "scheduler": "simple"},
        ("SaveImage", {"filename_prefix": "tlora_qwen_image"}),
        "a photo of sks dog on a beach at golden hour, a sign that says \"T-LoRA\"", "blurry, low quality",
        "Qwen-Image",
        "The shift (ModelSamplingAuraFlow) comes before the T-LoRA Loader, so the schedule preview charts the "
        "sigmas this KSampler runs.")


def wan_txt2video(oi: dict) -> dict:
    """Wan 2.1 text-to-video (1.3B) as ComfyUI's example runs it (SD3 shift 8, 832x480, 33 frames, uni_pc)."""
    return _ksampler_family(
        oi, WAN_T2V, WAN_TLORA, "wan", "ModelSamplingSD3", 8.0,
        ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        {"steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple"},
        ("SaveAnimatedWEBP", {"filename_prefix": "tlora_wan", "fps": 16.0, "lossless": False, "quality": 90}),
        "sks dog running through a snowy forest, tracking camera, daytime",
        "static, blurry, low quality, watermark, subtitles, still frame",
        "Wan 2.1 text-to-video",
        "The 14B text-to-video model (`wan2.1_t2v_14B_fp16.safetensors`) goes in the same place and runs the same "
        "way; use a T-LoRA trained on the model you load.")


BUILDERS = {
    "sdxl_tlora_txt2img": sdxl_txt2img,
    "flux_tlora_txt2img": flux_txt2img,
    "tlora_vs_plain_lora": tlora_vs_plain,
    "flux2_klein_tlora_txt2img": flux2_klein_txt2img,
    "qwen_image_tlora_txt2img": qwen_image_txt2img,
    "wan_tlora_txt2video": wan_txt2video,
}


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json"))


FIT_VIEW_JS = """(margin) => {
    const nodes = app.graph._nodes;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const el = app.canvas.canvas.getBoundingClientRect();
    const scale = Math.min(el.width / (x1 - x0 + 2 * margin), el.height / (y1 - y0 + 2 * margin));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(el.width / scale - (x1 - x0)) / 2 - x0, (el.height / scale - (y1 - y0)) / 2 - y0];
    app.canvas.setDirty(true, true);
    return scale;
}"""
# Everything but the graph (menus, tabs, side bar, minimap, toasts) is hidden for the thumbnails.
HIDE_CHROME_CSS = ".splitter-overlay-root, .p-toast { opacity: 0 !important; pointer-events: none !important; }"


def render_thumbnails(server_url: str, names: list[str], out_dir: Path, size=(800, 500)) -> None:
    """Load each example in ComfyUI's frontend (headless Chromium) and save a screenshot as ``<name>.jpg``."""
    import io

    from PIL import Image

    from .browser import open_comfy

    with open_comfy(server_url, viewport={"width": size[0] * 2, "height": size[1] * 2}) as page:
        page.add_style_tag(content=HIDE_CHROME_CSS)
        page.evaluate("() => { app.canvas.show_info = false; }")
        for name in names:
            wf = json.loads((out_dir / f"{name}.json").read_text())
            page.evaluate("async (wf) => { await app.loadGraphData(wf, true, false); }", wf)
            page.wait_for_timeout(300)
            page.evaluate(FIT_VIEW_JS, 40)
            page.wait_for_timeout(800)
            img = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
            img.thumbnail(size)
            img.save(out_dir / f"{name}.jpg", quality=88)


def main(argv=None) -> int:
    from .server import ComfyServer

    import tempfile

    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        oi = server.get("/object_info")
        for name, build in BUILDERS.items():
            wf = build(oi)
            problems = validate_workflow(wf, oi)
            if problems:
                print(f"{name}:\n  " + "\n  ".join(problems), file=sys.stderr)
                return 1
            (EXAMPLES / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
        render_thumbnails(server.url, list(BUILDERS), EXAMPLES)
    print("wrote", ", ".join(f"{n}.json/.jpg" for n in BUILDERS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
