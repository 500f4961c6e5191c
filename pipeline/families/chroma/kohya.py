"""Chroma's LoRA files under the names other tools load. Chroma's blocks are FLUX.1's without their
modulation Linears, so both layouts are Flux's:

- ComfyUI's Chroma model class is a subclass of its Flux one, so its LoRA loader maps a Chroma file through
  the same table as a Flux file: diffusers' `transformer.<module>` names (onto BFL's fused weights) and
  kohya's `lora_unet_<BFL module>` names. The diffusers file keeps peft's names (alpha folded into lora_B,
  pipeline/denoiser/lora.py); the kohya file is flux/kohya.py's, `.alpha` tensors included.
- diffusers' ChromaPipeline loads LoRAs with the Flux loader, whose kohya converter reads that layout.

The approximator (`distilled_guidance_layer`) has no name in ComfyUI's diffusers table, so no target preset
includes it (adapter.py) and kohya's layout refuses it.
"""

from __future__ import annotations

from pipeline.families.capabilities import LoraLayout
from pipeline.families.chroma.single_file import chroma_to_bfl
from pipeline.families.flux.kohya import to_kohya


class ChromaLayout(LoraLayout):
    """`ChromaFamily.lora_layout`: Flux's kohya layout; the diffusers file keeps peft's names."""

    kohya_metadata = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "chroma"}

    def __init__(self, prefix: str):
        self.prefix = prefix  # the denoiser's component, as the peft state dict's keys start

    def to_kohya(self, state_dict, alpha):
        return to_kohya(state_dict, alpha, self.prefix, label="Chroma")

    def single_file_names(self, state_dict):
        """A whole transformer in the layout of Chroma's released files, which ComfyUI loads (train.method = "full")."""
        return chroma_to_bfl(state_dict)
