"""The example workflows, checked against a real ComfyUI server's /object_info."""

from __future__ import annotations

import copy
import json

import pytest

from devkit import workflows as wfs

pytestmark = pytest.mark.server

NAMES = ["flux_tlora_txt2img", "sdxl_tlora_txt2img", "tlora_vs_plain_lora"]


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def load(name: str) -> dict:
    return json.loads((wfs.EXAMPLES / f"{name}.json").read_text())


def test_the_three_examples_exist_with_thumbnails():
    assert [p.stem for p in wfs.example_files()] == NAMES
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
    """The committed JSON is the builder's output for this server (rebuild: python -m devkit.workflows)."""
    assert load(name) == json.loads(json.dumps(wfs.BUILDERS[name](object_info)))


def test_examples_use_the_pack_as_intended():
    sdxl, flux, vs = load("sdxl_tlora_txt2img"), load("flux_tlora_txt2img"), load("tlora_vs_plain_lora")

    def nodes_of(wf, t):
        return [n for n in wf["nodes"] if n["type"] == t]

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
    assert any("widget values" in p for p in damaged(lambda wf: node(wf, "TLoraSchedulePreview")["widgets_values"].pop()))
    assert any("not connected" in p for p in damaged(lambda wf: node(wf, "VAEDecode")["inputs"][1].update(link=None)))

    def retarget(wf):  # plug the loader's info STRING into KSampler's model input
        link = next(lk for lk in wf["links"] if lk[5] == "STRING")
        ks = node(wf, "KSampler")
        link[3], link[4] = ks["id"], 0
    assert any("takes MODEL, gets STRING" in p for p in damaged(retarget))
