"""Fixtures: a real ComfyUI in-process (CPU; its GPU with ``TLORA_COMFY_GPU=1``), tiny real models, and a
real ComfyUI server.

The pack is importable as ``comfyui_tlora`` (see devkit.host.import_pack); ``tlora_core`` tests
need no ComfyUI at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devkit import host  # noqa: E402

host.import_pack()



@pytest.fixture(scope="module")
def single_threaded():
    """For modules of tiny-model tests (``pytestmark = pytest.mark.usefixtures("single_threaded")``)."""
    with host.one_thread():
        yield


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's ``comfy`` package, imported in-process (``devkit.host.load_comfy``)."""
    return host.load_comfy()


@pytest.fixture
def tiny_flux(comfy):
    from devkit.tiny_models import tiny_flux

    return tiny_flux(seed=0)


@pytest.fixture
def tiny_sdxl(comfy):
    from devkit.tiny_models import tiny_sdxl

    return tiny_sdxl(seed=0)


@pytest.fixture
def loras(comfy, tmp_path, monkeypatch):
    """A private ``loras`` model folder (and SVD cache) for the loader."""
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.setenv("COMFYUI_TLORA_CACHE", str(tmp_path / "cache"))
    return folder


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real ComfyUI server with this pack installed, on a free loopback port."""
    from devkit.server import ComfyServer

    server = ComfyServer(tmp_path_factory.mktemp("comfy-base"))
    server.start()
    yield server
    server.stop()
