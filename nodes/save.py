"""T-LoRA Save Self-Contained node (thin): a LyCORIS file plus the base terms rebuilt from the model.

LyCORIS ``tlora`` files leave out their frozen base terms, so every first load of one runs a
partial SVD of each adapted weight, and on an fp8/GGUF model that SVD only sees the quantized
weights. Saved once from the original model, the copy carries ``base_q``/``base_p``/``base_lambda``:
it loads with no SVD, and exactly, on any precision of that model.
"""

from __future__ import annotations

import os

from comfy_api.latest import io, ui


from ..comfy_glue import binding
from ..tlora_core.formats import SvdBaseTerms, read_tlora
from .inputs import CATEGORY, check_lora_name, lora_name_input, lora_path

SUFFIX = "_selfcontained"


def output_name(lora_name: str, filename: str) -> str:
    """The copy's name in the loras folder: ``filename`` (``.safetensors`` added) or the source's
    name with SUFFIX, in the source's subfolder. Plain names only: no path tricks."""
    folder, base = os.path.split(lora_name)
    if filename.strip():
        name = filename.strip()
        if os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"T-LoRA Save Self-Contained: filename {filename!r} must be a plain file name")
    else:
        name = os.path.splitext(base)[0] + SUFFIX
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return os.path.join(folder, name)


class TLoraSaveSelfContained(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoraSaveSelfContained",
            display_name="T-LoRA Save Self-Contained",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Writes a copy of a LyCORIS/SimpleTuner T-LoRA that carries its base terms, rebuilt from this model, "
                "into the loras folder. The copy loads without any SVD, and exactly on fp8/GGUF versions of the model: "
                "run this once with the original (unquantized) model the T-LoRA was trained on."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The original (unquantized) model the T-LoRA was trained on."),
                lora_name_input("The LyCORIS T-LoRA file, from the loras model folder."),
                io.String.Input("filename", default="",
                                tooltip=f"Name of the copy, saved next to the original. Empty: the original's name "
                                        f"with '{SUFFIX}'."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of that name if there is one (otherwise that is an error)."),
            ],
            outputs=[
                io.String.Output(display_name="lora_name",
                                 tooltip="The copy's name in the loras folder, as the T-LoRA Loader lists it."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return check_lora_name(lora_name)

    @classmethod
    def execute(cls, model, lora_name: str, filename: str, overwrite: bool) -> io.NodeOutput:
        src = lora_path(lora_name)
        name = output_name(lora_name, filename)
        dst = os.path.join(os.path.dirname(src), os.path.basename(name))
        if os.path.abspath(dst) == os.path.abspath(src):
            raise ValueError(f"T-LoRA Save Self-Contained: the copy would replace {lora_name} itself")
        if os.path.exists(dst) and not overwrite:
            raise FileExistsError(f"T-LoRA Save Self-Contained: {name} already exists in the loras folder "
                                  "(set overwrite, or choose another filename)")
        tfile = read_tlora(src)
        if not any(isinstance(m, SvdBaseTerms) for m in tfile.modules.values()):
            raise ValueError(f"T-LoRA Save Self-Contained: {lora_name} ({tfile.format}) is not a LyCORIS tlora file "
                             "without base terms: it needs no self-contained copy")
        bound = binding.bind_tlora(model, tfile, cache_dir=None, progress=True)  # cached SVDs are reused
        binding.save_self_contained(bound, dst)
        text = (f"saved {name}: {len(bound.base_terms)} module(s) with their base terms"
                + (f"; {len(bound.unmatched)} module(s) not on this model were copied without" if bound.unmatched else ""))
        return io.NodeOutput(name, ui=ui.PreviewText(text))
