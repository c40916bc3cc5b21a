"""Development kit shared by the tests, the demo and the benchmarks (not part of the node pack).

host: a real ComfyUI, in-process. tiny_models: small real models from ComfyUI's own classes.
diffusers_named: the same weights under diffusers module names, for lycoris-lora to wrap.
"""
