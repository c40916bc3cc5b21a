"""The pack in a real ComfyUI server: the node contract in /object_info, the templates, the file list."""

from __future__ import annotations

import json

import pytest

from devkit import workflows as wfs
from devkit.server import PACK_DIR_NAME

pytestmark = pytest.mark.server

CATEGORY = "loaders/T-LoRA"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def inputs(node: dict) -> dict:
    return {**node["input"]["required"], **node["input"].get("optional", {})}


def test_every_node_has_tooltips_descriptions_and_the_category(object_info):
    for node_id in ("TLoraLoader", "TLoraSchedule", "TLoraSchedulePreview", "TLoraSaveSelfContained"):
        node = object_info[node_id]
        assert node["category"] == CATEGORY
        assert len(node["description"]) > 40
        assert node["python_module"].startswith("custom_nodes.")
        for name, spec in inputs(node).items():
            assert len(spec) > 1 and len(spec[1].get("tooltip", "")) > 15, (node_id, name)
        assert all(node["output_tooltips"]), node_id


def test_loader_contract(object_info):
    node = object_info["TLoraLoader"]
    assert node["display_name"] == "T-LoRA Loader"
    assert node["input_order"] == {"required": ["model", "lora_name", "strength_model"],
                                   "optional": ["apply", "allow_partial", "mask", "schedule"]}
    req, opt = node["input"]["required"], node["input"]["optional"]
    assert opt["allow_partial"][0] == "BOOLEAN" and opt["allow_partial"][1]["default"] is False
    assert opt["mask"][0] == "COMBO" and opt["mask"][1]["options"] == ["timestep mask", "all ranks"]
    assert opt["apply"][0] == "COMBO" and opt["apply"][1]["options"] == ["per layer", "merge"]
    assert opt["apply"][1]["default"] == "per layer"
    assert req["model"][0] == "MODEL"
    assert req["lora_name"][0] == "COMBO"
    assert req["strength_model"][0] == "FLOAT" and req["strength_model"][1]["default"] == 1.0
    assert opt["schedule"][0] == "TLORA_SCHEDULE"
    assert node["output"][0] == "MODEL" and node["output"][1:] == ["STRING"]


def test_schedule_contract(object_info):
    node = object_info["TLoraSchedule"]
    assert node["display_name"] == "T-LoRA Schedule"
    assert node["input_order"] == {"required": ["max_rank", "min_rank", "alpha", "mode", "max_timestep"],
                                   "optional": ["boundary_timestep", "timestep_offset", "truncate_t"]}
    req = node["input"]["required"]
    assert req["max_rank"][0] == "INT" and req["max_rank"][1]["default"] == 0 and req["max_rank"][1]["min"] == 0
    assert req["min_rank"][0] == "INT" and req["min_rank"][1]["default"] == 1
    assert req["alpha"][0] == "FLOAT" and req["alpha"][1]["default"] == 1.0 and req["alpha"][1]["min"] > 0
    assert req["mode"][0] == "COMBO" and req["mode"][1]["options"] == ["timestep", "step_index"]
    assert req["max_timestep"][0] == "FLOAT" and req["max_timestep"][1]["default"] == 1000.0
    assert req["max_timestep"][1]["min"] < 1  # a float T: 1.0 for models whose time runs over [0, 1]
    opt = node["input"]["optional"]  # optional: prompts made before them still run
    assert opt["boundary_timestep"][0] == "FLOAT" and opt["boundary_timestep"][1]["default"] == 0.0
    assert opt["timestep_offset"][0] == "FLOAT" and opt["timestep_offset"][1]["default"] == 0.0
    assert opt["truncate_t"][0] == "COMBO" and opt["truncate_t"][1]["options"] == ["as in the file", "integer", "none"]
    assert node["output"] == ["TLORA_SCHEDULE"]


def test_preview_contract(object_info):
    node = object_info["TLoraSchedulePreview"]
    ks = object_info["KSampler"]["input"]["required"]
    assert node["display_name"] == "T-LoRA Schedule Preview"
    req, opt = node["input"]["required"], node["input"]["optional"]
    assert req["model"][0] == "MODEL" and opt["schedule"][0] == "TLORA_SCHEDULE"
    # the same sampler/scheduler choices as KSampler, so its settings can be copied over
    assert req["sampler_name"][1]["options"] == ks["sampler_name"][0]
    assert req["scheduler"][1]["options"] == ks["scheduler"][0]
    assert req["steps"][0] == "INT" and req["denoise"][0] == "FLOAT"
    assert node["output"] == ["IMAGE", "STRING"] and node["output_node"] is True


def test_lora_names_come_from_the_loras_folder_only(comfy_server):
    loras = comfy_server.base_dir / "models" / "loras"
    (loras / "sub").mkdir(exist_ok=True)
    (loras / "sub" / "listed_tlora.safetensors").write_bytes(b"\0" * 16)
    (comfy_server.base_dir / "models" / "checkpoints" / "not_a_lora.safetensors").write_bytes(b"\0" * 16)
    names = comfy_server.get("/object_info/TLoraLoader")["TLoraLoader"]["input"]["required"]["lora_name"][1]["options"]
    assert "sub/listed_tlora.safetensors" in names
    assert not any("not_a_lora" in n for n in names)
    # a path outside the folder is refused before anything runs
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "not_a_lora.safetensors"}},
              "2": {"class_type": "TLoraLoader",
                    "inputs": {"model": ["1", 0], "lora_name": "../checkpoints/not_a_lora.safetensors",
                               "strength_model": 1.0}},
              "3": {"class_type": "TLoraSchedulePreview",
                    "inputs": {"model": ["2", 0], "sampler_name": "euler", "scheduler": "normal", "steps": 4,
                               "denoise": 1.0}}}
    with pytest.raises(RuntimeError) as err:
        comfy_server.post("/prompt", {"prompt": prompt})
    body = json.loads(str(err.value).split(" -> 400: ", 1)[1])
    (bad,) = body["node_errors"]["2"]["errors"]
    assert bad["extra_info"]["input_name"] == "lora_name" and "not a file of the loras model folder" in bad["details"]
    assert set(body["node_errors"]) == {"2"}


def test_bad_combo_values_are_refused_when_queued(comfy_server):
    """ComfyUI 0.3.75 does not check V3 combo values; the nodes do, before anything runs."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
              "2": {"class_type": "TLoraSchedule",
                    "inputs": {"max_rank": 8, "min_rank": 1, "alpha": 1.0, "mode": "sigma", "max_timestep": 1000}},
              "3": {"class_type": "TLoraSchedulePreview",
                    "inputs": {"model": ["1", 0], "schedule": ["2", 0], "sampler_name": "eulerx", "scheduler": "normal",
                               "steps": 4, "denoise": 1.0}}}
    with pytest.raises(RuntimeError) as err:
        comfy_server.post("/prompt", {"prompt": prompt})
    errors = json.loads(str(err.value).split(" -> 400: ", 1)[1])["node_errors"]
    assert "mode must be one of timestep, step_index" in errors["2"]["errors"][0]["details"]
    assert "unknown sampler 'eulerx'" in errors["3"]["errors"][0]["details"]


def test_examples_are_in_the_template_browser(comfy_server):
    templates = comfy_server.get("/api/workflow_templates")
    assert sorted(templates[PACK_DIR_NAME]) == sorted(p.stem for p in wfs.example_files())
    for name in templates[PACK_DIR_NAME]:
        served = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        if isinstance(served, bytes):
            served = json.loads(served)
        assert served == json.loads((wfs.EXAMPLES / f"{name}.json").read_text())
        thumb = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")
        assert thumb[:3] == b"\xff\xd8\xff" and thumb == (wfs.EXAMPLES / f"{name}.jpg").read_bytes()


def test_web_extension_is_served(comfy_server):
    exts = comfy_server.get("/extensions")
    ours = [e for e in exts if e.startswith(f"/extensions/{PACK_DIR_NAME}/")]
    assert ours == [f"/extensions/{PACK_DIR_NAME}/tlora_schedule.js"]
    js = comfy_server.get(ours[0])
    js = js.decode() if isinstance(js, bytes) else js
    assert 'registerExtension' in js and '"TLoraSchedule"' in js


@pytest.fixture(scope="module")
def demo(comfy_server):
    """The demo engineer's generated checkpoint (SD1.5-detected) and T-LoRA, linked into the server's models/."""
    from devkit.demo_assets import make_demo_assets

    return make_demo_assets(comfy_server.base_dir / "models")


def test_schedule_preview_runs_in_the_server(comfy_server, demo):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo["checkpoint"]}},
              "2": {"class_type": "TLoraSchedule",
                    "inputs": {"max_rank": 16, "min_rank": 2, "alpha": 1.5, "mode": "timestep", "max_timestep": 1000}},
              "3": {"class_type": "TLoraSchedulePreview",
                    "inputs": {"model": ["1", 0], "schedule": ["2", 0], "sampler_name": "euler", "scheduler": "normal",
                               "steps": 6, "denoise": 1.0}}}
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = entry["outputs"]["3"]
    (img,) = out["images"]
    png = comfy_server.get(f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}")
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(png)).size == (768, 432)
    (table,) = out["text"]
    rows = [line.split() for line in table.splitlines()[1:7]]
    ranks = [int(r[-1].split("/")[0]) for r in rows]
    ts = [float(r[2]) for r in rows]
    # SD1.5 (discrete): t is the scheduler's timestep, 999 at the first step; r = floor(u^1.5 * 14) + 2
    assert ts[0] == 999.0 and ts == sorted(ts, reverse=True)
    assert ranks == [min(16, int(((1000 - int(t)) / 1000) ** 1.5 * 14) + 2) for t in ts]
    assert ranks[0] == 2 and ranks[-1] > 8


DEMO_WORKFLOW = wfs.EXAMPLES / "api" / "demo_tiny_tlora.json"


def demo_prompt(demo: dict) -> dict:
    prompt = json.loads(DEMO_WORKFLOW.read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = demo["checkpoint"]
        if node["class_type"] == "TLoraLoader":
            node["inputs"]["lora_name"] = demo["lora"]
    return prompt


def view(comfy_server, image: dict):
    from PIL import Image
    import io

    png = comfy_server.get(f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}")
    return Image.open(io.BytesIO(png)).convert("RGB")


def test_demo_workflow_runs_and_makes_images(comfy_server, demo):
    import numpy as np

    prompt = demo_prompt(demo)
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = {nid: entry["outputs"][nid]["images"] for nid, n in prompt.items() if n["class_type"] == "SaveImage"}
    assert len(saved) == 4 and all(len(v) == 1 for v in saved.values())
    images = {prompt[nid]["inputs"]["filename_prefix"].split("/")[-1]: np.asarray(view(comfy_server, v[0]), np.float32)
              for nid, v in saved.items()}
    assert images["tlora_masked"].shape == (128, 128, 3) and images["rank_per_step"].shape == (432, 768, 3)
    # masked T-LoRA, every rank on every step, and no LoRA: three different pictures
    for a, b in (("tlora_masked", "lora_unmasked"), ("tlora_masked", "base"), ("lora_unmasked", "base")):
        assert np.abs(images[a] - images[b]).mean() > 1.0, (a, b)
    # the loader read the file's own training settings (SimpleTuner's lycoris_config metadata)
    infos = [entry["outputs"][nid]["text"][0] for nid, n in prompt.items()
             if n["class_type"] == "PreviewAny" and prompt[n["inputs"]["source"][0]]["class_type"] == "TLoraLoader"]
    (info,) = infos
    cfg = demo["lycoris_config"]
    assert f"  min_rank = {cfg['tlora_min_rank']}  (" in info and f"  alpha = {cfg['tlora_alpha']}  (" in info
    assert "lycoris_config" in info and "0 not matched" in info


def _error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    (err,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    return err


def _loader_prompt(demo: dict, lora_name: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo["checkpoint"]}},
            "2": {"class_type": "TLoraLoader",
                  "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}},
            "3": {"class_type": "TLoraSchedulePreview",
                  "inputs": {"model": ["2", 0], "sampler_name": "euler", "scheduler": "normal", "steps": 5,
                             "denoise": 1.0}},
            "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}


def test_bad_tloras_give_clear_errors_and_the_server_carries_on(comfy_server, demo, comfy):
    from devkit.tiny_models import tiny_flux
    from devkit.tlora_files import write_lycoris

    loras = comfy_server.base_dir / "models" / "loras"
    (loras / "corrupt_tlora.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 50)
    write_lycoris(tiny_flux(seed=0), loras / "flux_tlora.safetensors", rank=4)

    err = _error_of(comfy_server.run_prompt(_loader_prompt(demo, "corrupt_tlora.safetensors")))
    assert err["node_type"] == "TLoraLoader" and err["node_id"] == "2"
    assert "corrupt_tlora.safetensors" in err["exception_message"]

    err = _error_of(comfy_server.run_prompt(_loader_prompt(demo, "flux_tlora.safetensors")))
    assert err["node_type"] == "TLoraLoader"
    assert "flux_tlora.safetensors" in err["exception_message"] and "nothing matches this model" in err["exception_message"]

    entry = comfy_server.run_prompt(_loader_prompt(demo, demo["lora"]))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["3"]["images"] and "0 not matched" in entry["outputs"]["4"]["text"][0]


def test_a_changed_file_is_reloaded(comfy_server, demo):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    src = demo["paths"]["lora"]
    dst = comfy_server.base_dir / "models" / "loras" / "changing_tlora.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))

    def write(tlora_alpha):
        cfg = dict(json.loads(meta["lycoris_config"]), tlora_alpha=tlora_alpha)
        save_file(tensors, str(dst), dict(meta, lycoris_config=json.dumps(cfg)))

    def cached_nodes(entry):
        return {n for m in entry["status"]["messages"] if m[0] == "execution_cached" for n in m[1]["nodes"]}

    prompt = _loader_prompt(demo, dst.name)
    write(1.0)
    first = comfy_server.run_prompt(prompt)
    again = comfy_server.run_prompt(prompt)
    assert "  alpha = 1  (" in first["outputs"]["4"]["text"][0]
    assert {"1", "2"} <= cached_nodes(again)  # unchanged file: nothing reloaded
    write(3.0)
    changed = comfy_server.run_prompt(prompt)
    assert "2" not in cached_nodes(changed)
    assert "  alpha = 3  (" in changed["outputs"]["4"]["text"][0]
    assert changed["outputs"]["3"]["text"][0] != first["outputs"]["3"]["text"][0]


def test_self_contained_copy_is_saved_and_loads_in_the_server(comfy_server, demo):
    """Save node in a real prompt: the copy appears in the loras list and loads from it."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo["checkpoint"]}},
              "2": {"class_type": "TLoraSaveSelfContained",
                    "inputs": {"model": ["1", 0], "lora_name": demo["lora"], "filename": "demo_copy", "overwrite": True}}}
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (text,) = entry["outputs"]["2"]["text"]
    assert text.startswith("saved demo_copy.safetensors:") and "base terms" in text
    listed = comfy_server.get("/models/loras")
    assert "demo_copy.safetensors" in listed
    entry = comfy_server.run_prompt(_loader_prompt(demo, "demo_copy.safetensors"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    info = entry["outputs"]["4"]["text"][0]
    assert "with stored base terms" in info and "rebuilt by SVD" not in info
