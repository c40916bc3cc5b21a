"""A real ComfyUI, imported in-process (on the CPU; on the GPU with ``TLORA_COMFY_GPU=1``), and this
pack imported the way ComfyUI imports it."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_tlora"


def comfyui_path() -> Path:
    """The ComfyUI checkout in use: $COMFYUI_PATH, else the project's own .comfyui/."""
    path = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui").resolve()
    if not (path / "comfy").is_dir():
        raise RuntimeError(f"No ComfyUI at {path}: run `make setup` or set COMFYUI_PATH to a ComfyUI checkout.")
    return path


def load_comfy(cpu: Optional[bool] = None):
    """Import ComfyUI's modules from comfyui_path(); returns the ``comfy`` package.

    ``cpu`` None: on the CPU, unless ``TLORA_COMFY_GPU=1`` (the test suite on a GPU machine).
    """
    if cpu is None:
        cpu = os.environ.get("TLORA_COMFY_GPU") != "1"
    path = str(comfyui_path())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads the args above)
    import comfy.lora  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.utils  # noqa: F401

    return comfy


def import_pack():
    """This repository as the package ``comfyui_tlora``, without running its ``__init__``.

    The pack's modules use relative imports (as ComfyUI loads custom nodes as packages); this
    makes ``comfyui_tlora.tlora_core`` and ``comfyui_tlora.nodes`` importable from tests, demo and
    benchmarks with one module identity.
    """
    if PACK_NAME not in sys.modules:
        pkg = types.ModuleType(PACK_NAME)
        pkg.__path__ = [str(ROOT)]
        pkg.__file__ = str(ROOT / "__init__.py")
        sys.modules[PACK_NAME] = pkg
    return sys.modules[PACK_NAME]


def pack_module(name: str):
    """``pack_module("comfy_glue.patcher")`` -> the module ``comfyui_tlora.nodes.patcher``."""
    import_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


@contextlib.contextmanager
def one_thread():
    """One intra-op thread for tiny ops (on a busy 2-core box their OpenMP synchronisation costs
    more than their work); restores the previous setting."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
