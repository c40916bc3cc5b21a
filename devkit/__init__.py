"""Development kit shared by the tests, the demo and the benchmarks (not part of the node pack).

host: a real ComfyUI, in-process. families: per model family, a tiny diffusers model and the
ComfyUI model with the same weights, built the way ComfyUI builds one. tiny_models: the Flux and
SDXL ones most tests use. tlora_files: real T-LoRA files in every trainer's layout. server,
browser, workflows, demo_assets: a real ComfyUI server, its frontend, the example workflows and the
demo's generated models.
"""
