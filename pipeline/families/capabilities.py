"""What a family may do beyond the stages' needs (`base.Family`), each a small protocol reached through one
attribute of the family, None where the family lacks it:

- `family.planning` (`Planning`): the memory planner's dry run, and the family's full-size public configs
  and rows of the memory table of docs/memory.md (plan-memory, make memory-table, make bench-memory, bench-gpu).
  It is a class attribute: the tables use it before any model folder exists.
- `family.lora_layout` (`LoraLayout`): the LoRA under the names other tools load (kohya's layout for
  train.lora_format = "kohya"; the diffusers file's names ComfyUI maps).
- `family.sampling` (`Sampling`): rendering through the family's own diffusers pipeline (validation
  grids, `python -m pipeline sample`).

A consumer asks `require(family, "planning", "plan-memory")`: the capability, or a one-line UserError
naming the config key or command that needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch


class Planning(Protocol):
    """What the memory planner (pipeline/memory.py) and the tables built from it ask of a family."""

    label: str  # how the benches' text names the family
    # the public full-size model (its repositories' config.json, non-default keys): what docs/memory.md's
    # memory table and the benches build with random weights, without a download
    denoiser_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]  # diffusers AutoencoderKL
    text_encoder_configs: Mapping[str, tuple[str, Mapping[str, Any]]]  # component -> (transformers class, config)
    # the memory table of docs/memory.md: (model.quantize, train.blocks_to_swap, processes train.fsdp shards
    # across), and optionally the cache stage's text encoders: model.text_encoder_quantize or "offload"
    table_rows: tuple[tuple, ...]
    sequence_length_applies: bool  # model.max_sequence_length sets the text tokens (False: a fixed length)
    conv_denoiser: bool  # the denoiser convolves (a CPU measurement holds im2col columns, see bench_memory)
    # further public models of the family (another size), each a Planning of its own: the memory table gives
    # each its own rows, named "<family> (<its label>)"
    variants: tuple[Planning, ...] = ()
    # the pipeline class the public model's model_index.json names, where the family reads it (None: the
    # family's first pipeline class)
    pipeline_class: str | None = None

    def dry_run_shapes(self, config: dict, batch: int, resolution: int, max_sequence_length: int
                       ) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
        """The shapes of a batch of latents (B,C,h,w) at a square `resolution` and of its cached
        conditioning (as the family's `predict` takes it), for a denoiser config (dict);
        max_sequence_length 0: the family's default."""

    def dry_run(self) -> contextlib.AbstractContextManager:
        """A context in which the family's `predict` runs on meta tensors (default: as it is)."""
        return contextlib.nullcontext()

    def block_depths(self, config: dict) -> dict[str, int]:
        """How many identical blocks of each kind the denoiser config stacks (config key -> count), so a
        dry run of a cut model (see with_depths) stands for the whole; {}: no cut."""
        return {}

    def with_depths(self, config: dict, depths: dict[str, int]) -> dict:
        """The denoiser config with the block counts of `depths` (keys as block_depths gives them)."""
        return {**config, **depths}


class LoraLayout(Protocol):
    """The LoRA file under names that tools other than peft load."""

    kohya_metadata: Mapping[str, str] = MappingProxyType({})  # written into kohya-format files (ss_network_module...)
    # module -> the stem of its LoKr/LoHa tensors in train.lora_format = "lycoris", a name ComfyUI maps onto
    # it; None: '<denoiser_component>.<module>' (peft's names, which ComfyUI maps for the transformers)
    lycoris_stem: Callable[[str], str] | None = None
    # a whole denoiser's state dict (diffusers' names) -> the family's original single-file checkpoint layout,
    # which ComfyUI's model loader reads (train.method = "full"); None: the file keeps diffusers' names
    single_file_names: Callable[[dict], dict] | None = None

    def to_kohya(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """The LoRA as peft holds it (keys '<denoiser_component>.<module>.lora_A.weight' / '.lora_B.weight',
        the scale alpha/rank not applied) in the family's kohya/ComfyUI layout, such that the family's
        pipeline's load_lora_weights and ComfyUI give the same denoiser. UserError naming train.lora_format
        for modules the layout cannot hold."""

    def diffusers_layout(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The diffusers-format LoRA (peft's key names) under the names the family's diffusers file uses:
        names that both the family's load_lora_weights and ComfyUI map onto the denoiser. peft's own, unless
        a family says otherwise."""
        return state_dict


class Sampling(Protocol):
    """Rendering through the family's own text-to-image pipeline (base.render_cached, base.load_full_pipeline)."""

    pipeline_class: str  # the diffusers text-to-image pipeline
    negative_is_empty_caption: bool = False  # the pipeline's guidance encodes "" as the negative prompt

    def pipeline_layout(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batched cached conditioning in the layout the pipeline takes as `*_embeds` arguments."""
        return cond


class PipelineSampling(Sampling):
    """A pipeline that takes the cached conditioning as it is."""

    def __init__(self, pipeline_class: str, negative_is_empty_caption: bool = False):
        self.pipeline_class = pipeline_class
        self.negative_is_empty_caption = negative_is_empty_caption


_WHAT = {"planning": "memory planning", "lora_layout": "kohya/ComfyUI layout", "sampling": "sampling pipeline"}


def require(family, capability: str, needed_by: str):
    """`family.<capability>`, or a one-line UserError saying that `needed_by` (a config key with its value,
    or a command) needs what this family lacks."""
    found = getattr(family, capability, None)
    if found is None:
        raise UserError(f"{needed_by}: the {family.name} family has no {_WHAT[capability]}")
    return found
