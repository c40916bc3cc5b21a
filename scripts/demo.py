"""`make demo`: a T-LoRA run on a real ComfyUI server, with models it makes itself.

1. makes (once, cached in .cache/demo-assets/) a tiny SD1.5-detected checkpoint and a T-LoRA
   saved the way SimpleTuner saves one (devkit/demo_assets.py), links them into a private server
   base dir (.cache/demo-base/models/);
2. starts ComfyUI on a free loopback port with this pack installed (devkit/server.py);
3. queues example_workflows/api/demo_tiny_tlora.json through the HTTP API: the same seed sampled
   with the T-LoRA masked (its schedule read from the file), unmasked (every rank at every step)
   and without it, plus the T-LoRA Schedule Preview for KSampler's sigmas;
4. copies the results into out/ and writes out/summary.json (settings, sigmas, timesteps and the
   active rank per step as the server reported them, image differences).

    .venv/bin/python scripts/demo.py [--out out] [--base-dir .cache/demo-base]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devkit import demo_assets  # noqa: E402
from devkit.server import ComfyServer, prepare_base_dir  # noqa: E402

WORKFLOW = ROOT / "example_workflows" / "api" / "demo_tiny_tlora.json"
PREFIX = "tlora_demo/"  # SaveImage filename_prefix = PREFIX + the name the image gets in out/
IMAGES = ("tlora_masked", "lora_unmasked", "base", "rank_per_step")
CAPTIONS = {"tlora_masked": "T-LoRA, masked (trained schedule)", "lora_unmasked": "unmasked: all ranks, every step",
            "base": "base model, no LoRA"}


def load_workflow(assets: dict, path: Path = WORKFLOW) -> dict:
    """The API-format workflow with the generated files' names filled in."""
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = assets["checkpoint"]
        if node["class_type"] == "TLoraLoader":
            inputs["lora_name"] = assets["lora"]
    return prompt


def node_of(prompt: dict, class_type: str, **match) -> str:
    """The id of the one node of ``class_type`` whose inputs contain ``match``."""
    ids = [i for i, n in prompt.items() if n["class_type"] == class_type
           and all(n["inputs"].get(k) == v for k, v in match.items())]
    if len(ids) != 1:
        raise ValueError(f"workflow: expected one {class_type} with {match}, found {ids}")
    return ids[0]


def parse_rank_table(table: str) -> list[dict]:
    """Rows of the T-LoRA Schedule Preview's table: step, sigma, t, active rank / max rank."""
    rows = []
    for line in table.splitlines()[1:]:
        if not line.strip():
            break
        step, sigma, t, rank = line.split()[:4]
        active, max_rank = rank.split("/")
        rows.append({"step": int(step), "sigma": float(sigma), "t": float(t),
                     "rank": int(active), "max_rank": int(max_rank)})
    return rows


def image_stats(paths: dict) -> dict:
    """Mean absolute pixel difference (0..1) between each pair of sampled images."""
    import numpy as np
    from PIL import Image

    arrays = {k: np.asarray(Image.open(paths[k]).convert("RGB"), dtype=np.float32) / 255 for k in CAPTIONS}
    names = list(CAPTIONS)
    return {f"{a} vs {b}": round(float(np.abs(arrays[a] - arrays[b]).mean()), 4)
            for i, a in enumerate(names) for b in names[i + 1:]}


def comparison(paths: dict, dest: Path) -> None:
    """The three samples side by side, captioned, above the rank chart."""
    from PIL import Image, ImageDraw

    scale, pad, cap = 2, 8, 18
    tiles = [Image.open(paths[k]).convert("RGB") for k in CAPTIONS]
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    chart = Image.open(paths["rank_per_step"]).convert("RGB")
    w = max(sum(t.width for t in tiles) + pad * (len(tiles) + 1), chart.width)
    h = cap + max(t.height for t in tiles) + pad * 2 + chart.height
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    x = pad
    for (key, caption), tile in zip(CAPTIONS.items(), tiles):
        draw.text((x, 3), caption, fill="black")
        sheet.paste(tile, (x, cap))
        x += tile.width + pad
    sheet.paste(chart, (0, cap + max(t.height for t in tiles) + pad * 2))
    sheet.save(dest)


def run_demo(out_dir: Path, base_dir: Path | None = None, server: ComfyServer | None = None,
             log=print) -> dict:
    """Run the demo workflow and write out_dir/*; returns the summary (also out_dir/summary.json).

    With ``server`` (e.g. the tests' session server) the assets go into its base dir and it is
    left running; otherwise a server is started in ``base_dir`` and stopped at the end.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    base = Path(server.base_dir if server else base_dir or ROOT / ".cache" / "demo-base")
    prepare_base_dir(base)
    log(f"[demo] models: generating or reusing the tiny checkpoint and T-LoRA ({demo_assets.CACHE_DIR})")
    assets = demo_assets.make_demo_assets(base / "models")
    prompt = load_workflow(assets)
    own = server is None
    if own:
        shutil.rmtree(base / "output" / PREFIX.strip("/"), ignore_errors=True)  # earlier runs' images
        log(f"[demo] starting ComfyUI (base dir {base})")
        server = ComfyServer(base).start()
    try:
        log(f"[demo] server at {server.url}; queueing {WORKFLOW.relative_to(ROOT)}")
        t1 = time.time()
        entry = server.run_prompt(copy.deepcopy(prompt))
        run_s = time.time() - t1
        if entry["status"].get("status_str") != "success":
            messages = json.dumps(entry["status"].get("messages"), indent=1)[-4000:]
            raise RuntimeError(f"the demo workflow failed:\n{messages}\n--- server log ---\n{server.log()[-4000:]}")
        version = server.get("/system_stats")["system"]["comfyui_version"]
    finally:
        if own:
            server.stop()
    outputs = entry["outputs"]

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in IMAGES:
        node = node_of(prompt, "SaveImage", filename_prefix=PREFIX + name)
        image = outputs[node]["images"][0]
        src = base / "output" / image["subfolder"] / image["filename"]
        written[name] = out_dir / f"{name}.png"
        shutil.copyfile(src, written[name])
    written["comparison"] = out_dir / "comparison.png"
    comparison(written, written["comparison"])

    table = outputs[node_of(prompt, "PreviewAny", source=[node_of(prompt, "TLoraSchedulePreview"), 1])]["text"][0]
    loader_info = outputs[node_of(prompt, "PreviewAny", source=[node_of(prompt, "TLoraLoader", strength_model=1.0,
                                                                             schedule=None), 1])]["text"][0]
    sampler = prompt[node_of(prompt, "KSampler", model=[node_of(prompt, "TLoraLoader", schedule=None), 0])]["inputs"]
    latent = prompt[node_of(prompt, "EmptyLatentImage")]["inputs"]
    steps = parse_rank_table(table)
    summary = {
        "comfyui_version": version,
        "workflow": str(WORKFLOW.relative_to(ROOT)),
        "checkpoint": assets["checkpoint"],
        "lora": assets["lora"],
        "lycoris_config": assets["lycoris_config"],
        "seed": sampler["seed"],
        "steps": sampler["steps"],
        "cfg": sampler["cfg"],
        "sampler_name": sampler["sampler_name"],
        "scheduler": sampler["scheduler"],
        "denoise": sampler["denoise"],
        "size": [latent["width"], latent["height"]],
        "prompt": prompt[sampler["positive"][0]]["inputs"]["text"],
        "sigmas": [row["sigma"] for row in steps],
        "timesteps": [row["t"] for row in steps],
        "ranks": [row["rank"] for row in steps],
        "max_rank": steps[0]["max_rank"] if steps else None,
        "rank_table": table,
        "loader_info": loader_info,
        "image_difference": image_stats(written),
        "files": {k: str(p) for k, p in written.items()},
        "workflow_seconds": round(run_s, 1),
        "total_seconds": round(time.time() - t0, 1),
    }
    written["summary"] = out_dir / "summary.json"
    summary["files"]["summary"] = str(written["summary"])
    written["summary"].write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out", help="where the results go (default: out/)")
    parser.add_argument("--base-dir", type=Path, default=ROOT / ".cache" / "demo-base",
                        help="the server's private base dir (models/, output/, user/)")
    args = parser.parse_args(argv)
    # The demo's models are tiny and gain nothing from threads, while on a busy 2-core machine
    # OpenMP workers spin against each other (measured at load ~5: workflow 8-10 s with one thread,
    # 35-44 s with two). The server inherits this; a value the user set is kept.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = run_demo(args.out, args.base_dir)
    print("\n[demo] active rank per step (T-LoRA Schedule Preview, as the masked KSampler runs):")
    print("\n".join("    " + line for line in summary["rank_table"].splitlines()))
    print("\n[demo] mean absolute pixel difference: " +
          ", ".join(f"{k}: {v}" for k, v in summary["image_difference"].items()))
    print(f"[demo] workflow ran in {summary['workflow_seconds']} s, demo total {summary['total_seconds']} s")
    print("[demo] wrote:")
    for name, path in summary["files"].items():
        p = Path(path)
        shown = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
        print(f"    {shown}  ({p.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
