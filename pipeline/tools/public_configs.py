"""The public full-size models, as each family's planning capability gives their configs
(`family.planning.denoiser_config`, `.vae_config`, `.text_encoder_configs`: their repositories'
`config.json`, non-default keys), built here so that the memory planner's table and the benches can use
these architectures with random weights, without a download."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def planning(name: str):
    """The planning capability of the family `name` (the class's: no model folder is needed)."""
    from pipeline.families import family_class
    from pipeline.families.capabilities import require

    return require(family_class(name), "planning", "make memory-table and the benches")


def encoder_params(name: str, public=None) -> dict[str, int]:
    """Parameter counts of the family's public VAE and text encoders (those of `public`, one of its planning
    variants, where given), built from their configs on the meta device (the counts are beside each
    family's configs, in its planning.py)."""
    import torch
    import transformers

    from pipeline.memory import vae_class

    public = public or planning(name)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        out = {"vae": count(vae_class(public.vae_config).from_config(dict(public.vae_config)))}
        for component, (cls_name, config) in public.text_encoder_configs.items():
            cls = getattr(transformers, cls_name)
            out[component] = count(cls(cls.config_class(**config)))
    return out


class _Encoders(dict):
    """ENCODERS[name], counted on first use (building the configs on meta takes a second)."""

    def __missing__(self, name):
        self[name] = encoder_params(name)
        return self[name]


ENCODERS = _Encoders()


def cut_config(name: str, blocks: int = 1) -> dict:
    """The public denoiser config at full width, cut to `blocks` blocks of each kind (planning.with_depths):
    what `make bench-memory` measures on a CPU."""
    p = planning(name)
    config = dict(p.denoiser_config)
    return p.with_depths(config, {k: min(n, blocks) for k, n in p.block_depths(config).items()})


def save_cut_model(name: str, root: Path, blocks: int = 1, dtype=None) -> Path:
    """A normal diffusers folder at `root` holding the cut denoiser (random weights, safetensors) and the
    VAE's config, so that a config's model.path can point at it and plan-memory reads it as any model."""
    import torch

    from pipeline.families import family_class

    cls = family_class(name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        model = cls.denoiser_class.from_config(cut_config(name, blocks))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(root / cls.denoiser_component)  # safetensors, written by diffusers
    (root / "vae").mkdir(parents=True, exist_ok=True)
    vae = {"_class_name": "AutoencoderKL", **planning(name).vae_config}
    (root / "vae" / "config.json").write_text(json.dumps(vae))
    index = {"_class_name": cls.pipeline_classes[0], cls.denoiser_component: ["diffusers", cls.denoiser_class.__name__],
             "vae": ["diffusers", vae["_class_name"]]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def public_family(name: str, public=None):
    """A family object over a folder holding only the public denoiser config (what predict reads): the
    family's own public model, or `public`, one of its planning variants."""
    from pipeline.config import ModelConfig
    from pipeline.families import family_class

    cls, public = family_class(name), public or planning(name)
    root = Path(tempfile.mkdtemp(prefix=f"prior-lora-{name}-"))
    (root / cls.denoiser_component).mkdir()
    (root / cls.denoiser_component / "config.json").write_text(json.dumps(public.denoiser_config))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps(public.vae_config))
    # the pipeline it is for (FLUX.2 dev's guidance depends on it)
    index = {"_class_name": public.pipeline_class or cls.pipeline_classes[0]}
    (root / "model_index.json").write_text(json.dumps(index))
    return cls(root, ModelConfig(path=str(root)))
