"""Host-free T-LoRA core: rank schedules, the adapter representation and every trainer's format.

Pure torch/numpy/safetensors; imports nothing from ComfyUI, so it can be used and tested alone.
"""
