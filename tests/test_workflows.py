"""The example workflows, checked against a real ComfyUI server's /object_info.

The checks hold on every host the pack supports (ComfyUI 0.3.75 and 0.28 here): they compare what a
workflow means (node types, widget values by input name, links between named sockets), not one
host's slot lists.
"""

from __future__ import annotations

import copy
import json

import pytest

from devkit import workflows as wfs

pytestmark = pytest.mark.server

# the model families of the examples: (model loader, CLIPLoader type, model-sampling shift, latent node)
FAMILIES = {
    "flux2_klein_tlora_txt2img": ("UNETLoader", "flux2", None, "EmptyFlux2LatentImage"),
    "qwen_image_tlora_txt2img": ("UNETLoader", "qwen_image", "ModelSamplingAuraFlow", "EmptySD3LatentImage"),
    "wan_tlora_txt2video": ("UNETLoader", "wan", "ModelSamplingSD3", "EmptyHunyuanLatentVideo"),
}
NAMES = sorted(["flux_tlora_txt2img", "sdxl_tlora_txt2img", "tlora_vs_plain_lora", *FAMILIES])
MODEL_LOADERS = {"CheckpointLoaderSimple", "UNETLoader"}
SAMPLERS = {"KSampler", "SamplerCustomAdvanced"}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def load(name: str) -> dict:
    return json.loads((wfs.EXAMPLES / f"{name}.json").read_text())


def nodes_of(wf: dict, t: str) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == t]


def source(wf: dict, node: dict, input_name: str) -> dict | None:
    """The node whose output feeds ``input_name`` of ``node``."""
    (inp,) = [i for i in node["inputs"] if i["name"] == input_name]
    link = next((lk for lk in wf["links"] if lk[0] == inp["link"]), None)
    return None if link is None else next(n for n in wf["nodes"] if n["id"] == link[1])


def model_path(wf: dict, sampler: dict) -> list[str]:
    """The node types the sampler's model comes through, back to the model loader."""
    node = source(wf, sampler, "guider") if sampler["type"] == "SamplerCustomAdvanced" else sampler
    path = []
    while node["type"] not in MODEL_LOADERS:
        node = source(wf, node, "model")
        path.append(node["type"])
    return path


def test_the_examples_exist_with_thumbnails():
    assert [p.stem for p in wfs.example_files()] == NAMES == sorted(wfs.BUILDERS)
    for name in NAMES:
        jpg = (wfs.EXAMPLES / f"{name}.jpg").read_bytes()
        assert jpg[:3] == b"\xff\xd8\xff" and len(jpg) > 10_000  # a real JPEG, not a placeholder


@pytest.mark.parametrize("name", NAMES)
def test_example_is_valid_for_the_running_server(object_info, name):
    wf = load(name)
    assert wfs.validate_workflow(wf, object_info) == []
    types = {n["type"] for n in wf["nodes"]}
    assert "TLoraLoader" in types
    # the node pack's nodes are really there, not skipped as frontend-only
    assert types - wfs.VIRTUAL <= set(object_info)


@pytest.mark.parametrize("name", NAMES)
def test_example_files_are_what_the_builder_makes(object_info, name):
    """The committed JSON means what the builder makes for this server (rebuild: python -m devkit.workflows):
    same nodes, widget values by input name and links between named sockets, whatever slots the host adds."""
    built = json.loads(json.dumps(wfs.BUILDERS[name](object_info)))
    assert wfs.validate_workflow(built, object_info) == []
    assert wfs.essentials(load(name), object_info) == wfs.essentials(built, object_info)


def test_examples_use_the_pack_as_intended():
    sdxl, flux, vs = load("sdxl_tlora_txt2img"), load("flux_tlora_txt2img"), load("tlora_vs_plain_lora")

    assert nodes_of(sdxl, "CheckpointLoaderSimple")[0]["widgets_values"] == ["sd_xl_base_1.0.safetensors"]
    assert nodes_of(flux, "UNETLoader")[0]["widgets_values"][0] == "flux1-dev.safetensors"
    # Flux: the schedule node is there, wired, and bypassed (the file's settings apply until it is enabled)
    (sch,) = nodes_of(flux, "TLoraSchedule")
    assert sch["mode"] == wfs.MODE_BYPASS and sch["outputs"][0]["links"]
    # side by side: the same file through the T-LoRA loader and ComfyUI's plain LoRA loader, same seed
    (tl,), (pl,) = nodes_of(vs, "TLoraLoader"), nodes_of(vs, "LoraLoaderModelOnly")
    assert tl["widgets_values"][0] == pl["widgets_values"][0]
    seeds = {n["widgets_values"][0] for n in nodes_of(vs, "KSampler")}
    assert len(nodes_of(vs, "KSampler")) == 2 and len(seeds) == 1
    assert nodes_of(vs, "ImageStitch")
    for wf in (sdxl, flux):
        (sampler,) = nodes_of(wf, "KSampler")
        assert model_path(wf, sampler)[0] == "TLoraLoader"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_examples_load_the_family_as_comfyui_does(object_info, name):
    """Flux.2 Klein, Qwen-Image and Wan: the family's own loaders, text encoder type and latent, and the
    T-LoRA Loader between the model loader (after its shift) and the sampler."""
    wf = load(name)
    loader, clip_type, shift, latent = FAMILIES[name]

    def values(node):
        return wfs.widget_values(node, object_info[node["type"]])

    (unet,), (clip,), (vae,) = nodes_of(wf, loader), nodes_of(wf, "CLIPLoader"), nodes_of(wf, "VAELoader")
    assert values(clip)["type"] == clip_type
    for node, key in ((unet, "unet_name"), (clip, "clip_name"), (vae, "vae_name")):
        assert values(node)[key].endswith(".safetensors")
    assert nodes_of(wf, latent)
    (sampler,) = [n for n in wf["nodes"] if n["type"] in SAMPLERS]
    assert model_path(wf, sampler) == ["TLoraLoader"] + ([shift] if shift else []) + [loader]
    (tl,) = nodes_of(wf, "TLoraLoader")
    assert values(tl)["lora_name"].endswith("_tlora.safetensors") and values(tl)["strength_model"] == 1.0
    # the schedule node is wired to the loader and bypassed: the file's settings apply until it is enabled
    (sch,) = nodes_of(wf, "TLoraSchedule")
    assert sch["mode"] == wfs.MODE_BYPASS and source(wf, tl, "schedule") is sch
    # the decoded result is saved, the loader's info is shown
    (dec,) = nodes_of(wf, "VAEDecode")
    assert source(wf, dec, "samples") is sampler and source(wf, dec, "vae") is vae
    assert any(source(wf, n, "source") is tl for n in nodes_of(wf, "PreviewAny"))
    assert any(source(wf, n, "images") is dec for n in wf["nodes"] if n["type"] in ("SaveImage", "SaveAnimatedWEBP"))
    previews = nodes_of(wf, "TLoraSchedulePreview")
    if sampler["type"] == "KSampler":  # the preview charts exactly this KSampler's steps
        (prev,) = previews
        assert source(wf, prev, "model") is tl
        ks = values(sampler)
        assert {k: values(prev)[k] for k in ("sampler_name", "scheduler", "steps")} == \
            {k: ks[k] for k in ("sampler_name", "scheduler", "steps")}
    # a note says where the files go and when the file's own schedule applies
    (note,) = [n for n in wf["nodes"] if n["type"] in wfs.VIRTUAL]
    text = note["widgets_values"][0]
    for node, key in ((unet, "unet_name"), (clip, "clip_name"), (vae, "vae_name")):
        assert values(node)[key] in text
    assert "models/loras/" in text and "T-LoRA Schedule" in text and "bypassed" in text


def test_builder_leaves_out_what_hosts_differ_in(object_info):
    """Output nodes carry only their linked outputs (0.28's SaveImage, SaveAnimatedWEBP and PreviewAny
    have one that 0.3.75's lack), so one file loads on both; the frontend adds the rest."""
    for name in NAMES:
        for node in load(name)["nodes"]:
            if object_info.get(node["type"], {}).get("output_node"):
                assert all(o["links"] for o in node["outputs"]), (name, node["type"])
    wf = load("sdxl_tlora_txt2img")
    save = nodes_of(wf, "SaveImage")[0]
    # a host that adds an output, or an optional widget, to a node does not make the file invalid
    info = copy.deepcopy(object_info)
    info["SaveImage"].update(output=["IMAGE"], output_name=["images"], output_is_list=[False])
    info["SaveImage"]["input"]["optional"] = {"extra": ["BOOLEAN", {"default": True}]}
    info["SaveImage"].setdefault("input_order", {})["optional"] = ["extra"]
    assert wfs.validate_workflow(wf, info) == []
    assert wfs.widget_values(save, info["SaveImage"]) == {"filename_prefix": "tlora_sdxl", "extra": True}
    assert wfs.essentials(wf, info)["links"] == wfs.essentials(wf, object_info)["links"]


def test_validator_catches_broken_workflows(object_info):
    """The check above can fail: each kind of damage is reported."""
    base = load("sdxl_tlora_txt2img")

    def damaged(edit):
        wf = copy.deepcopy(base)
        edit(wf)
        return wfs.validate_workflow(wf, object_info)

    def node(wf, t):
        return next(n for n in wf["nodes"] if n["type"] == t)

    assert any("unknown type" in p for p in damaged(lambda wf: node(wf, "KSampler").update(type="KSamplerX")))
    assert any("not one of" in p for p in damaged(lambda wf: node(wf, "KSampler")["widgets_values"].__setitem__(4, "eulerx")))
    assert any("outside" in p for p in damaged(lambda wf: node(wf, "TLoraLoader")["widgets_values"].__setitem__(1, 500.0)))
    assert any("not a boolean" in p for p in damaged(lambda wf: node(wf, "TLoraLoader")["widgets_values"].__setitem__(3, "no")))
    assert any("widget values" in p for p in damaged(lambda wf: node(wf, "TLoraSchedulePreview")["widgets_values"].pop()))
    assert any("widget values" in p for p in damaged(lambda wf: node(wf, "KSampler")["widgets_values"].append(1)))
    assert any("not connected" in p for p in damaged(lambda wf: node(wf, "VAEDecode")["inputs"][1].update(link=None)))
    assert any("outputs" in p for p in damaged(lambda wf: node(wf, "KSampler")["outputs"].clear()))
    assert any("outputs" in p for p in damaged(lambda wf: node(wf, "SaveImage")["outputs"].extend(
        [{"name": f"x{i}", "type": "IMAGE", "links": []} for i in range(3)])))

    def retarget(wf):  # plug the loader's info STRING into KSampler's model input
        link = next(lk for lk in wf["links"] if lk[5] == "STRING")
        ks = node(wf, "KSampler")
        link[3], link[4] = ks["id"], 0
    assert any("takes MODEL, gets STRING" in p for p in damaged(retarget))

    # the Schedule node's new widgets are checked like the others
    flux = load("flux_tlora_txt2img")
    sch = node(flux, "TLoraSchedule")
    names = [s[0] for s in wfs.widget_slots(object_info["TLoraSchedule"])]
    bad = copy.deepcopy(flux)
    node(bad, "TLoraSchedule")["widgets_values"][names.index("truncate_t")] = "round"
    assert any("truncate_t" in p and "not one of" in p for p in wfs.validate_workflow(bad, object_info))
    bad = copy.deepcopy(flux)
    node(bad, "TLoraSchedule")["widgets_values"][names.index("boundary_timestep")] = -5.0
    assert any("boundary_timestep" in p and "outside" in p for p in wfs.validate_workflow(bad, object_info))
    assert isinstance(sch["widgets_values"][names.index("max_timestep")], float)
