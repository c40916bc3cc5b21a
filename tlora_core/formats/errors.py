"""The error every reader raises: it names the file and what is wrong with it."""

from __future__ import annotations

import os

LORA_LOADER_HINT = "load it with ComfyUI's own LoraLoader (Load LoRA) instead"


class TLoRAFormatError(ValueError):
    """A file that cannot be used as a T-LoRA; the message names the file and what is wrong."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"T-LoRA file {os.path.basename(self.path)!r} ({self.path}): {problem}")
