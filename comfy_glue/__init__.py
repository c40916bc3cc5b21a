"""The ComfyUI glue, the only code that knows ComfyUI's internals besides the nodes' declarations.

binding      a file's modules placed on a model's layers (key_map + families), LyCORIS modules
             completed from the model's weights (base_terms, base_cache, weights)
patcher      the model_function_wrapper that sets each call's ranks; per-run attach / detach
hooks        per-layer application; merge: merged weights for a run
timesteps    sigma -> the trainer's timestep -> active ranks, per model-sampling class
"""
