"""The Comfy Registry's own check of the pack (comfy-cli's ``comfy node validate``): the
``pyproject.toml`` metadata, and the registry's security scan of the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.host import ROOT


def test_comfy_node_validate_passes():
    comfy = shutil.which("comfy", path=str(Path(sys.executable).parent))
    if comfy is None:
        pytest.skip("comfy-cli is not installed in this environment (requirements-dev.txt installs it)")
    out = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "All validation checks passed" in text and "warning" not in text.lower(), text
