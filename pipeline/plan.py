"""What a config needs from the cache: every sample with its keys. Both stages build the same plan,
so the train stage finds exactly what the cache stage wrote, and a stale entry is never found.

Key recipes (documented in the README):
  content  = digest("image", sha256(image bytes), resolution, PREPARE)
  latent   = digest("latent", content, vae fingerprint, encoder dtype)
  text     = digest("text", caption, text-encoder fingerprint, max_sequence_length, encoder dtype)
  noise[v] = digest("noise", content, v, cache seed, timestep sampling settings, scheduler table)
  prior[v] = digest("prior", latent, text, noise[v], denoiser fingerprint, train dtype, prediction settings)
  seed[v]  = derive_seed("noise", cache seed, content, v);  timestep draw seed: derive_seed("timestep", ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data import PREPARE, BadImage, check_header, scan_concept
from pipeline.errors import UserError, warn
from pipeline.families import Family, get_family
from pipeline.keys import Fingerprints, derive_seed, digest, sha256_bytes

BAD_IMAGE = "bad-image"  # store kind: content key -> why that image cannot be decoded
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Sample:
    path: Path
    concept: int
    prior: bool
    loss_weight: float
    repeats: int
    caption: str
    content_key: str
    latent_key: str
    text_key: str
    noise_keys: tuple[str, ...]  # one per variant
    seeds: tuple[int, ...]  # noise seed per variant
    timestep_seeds: tuple[int, ...]


@dataclass
class Plan:
    cfg: Config
    family: Family
    samples: list[Sample]
    vae_fp: str
    text_fp: str
    denoiser_fp: str
    skipped: list[str]  # "path: reason" for every image left out

    def skip(self, path: Path, reason: str) -> None:
        """Leave one image out (data.on_bad_image = "skip") or stop with a one-line error ("fail")."""
        if self.cfg.data.on_bad_image == "fail":
            raise UserError(f"image '{path}': {reason} (set data.on_bad_image = \"skip\" to leave it out)")
        warn(f"skipping '{path}': {reason}")
        self.skipped.append(f"{path}: {reason}")

    def drop_bad(self, store) -> None:
        """Leave out images the cache stage found it cannot decode (its verdict is cached by content)."""
        keep = []
        for s in self.samples:
            if store.has(BAD_IMAGE, s.content_key):
                self.skip(s.path, store.read(BAD_IMAGE, s.content_key)[1]["reason"])
            else:
                keep.append(s)
        self.samples = keep
        if not keep:
            raise UserError("no usable images in any concept (see the warnings above)")

    @property
    def dtype(self) -> str:
        return self.cfg.train.dtype

    def prior_kind(self, dtype: str | None = None) -> str:
        return f"prior/{dtype or self.dtype}"

    def prior_key(self, sample: Sample, variant: int, dtype: str | None = None) -> str:
        return digest(
            "prior", sample.latent_key, sample.text_key, sample.noise_keys[variant],
            self.denoiser_fp, dtype or self.dtype, self.family.prediction_settings(),
        )


def _component_fp(fps: Fingerprints, root: Path, names) -> str:
    return digest([[n, fps.folder(root / n)] for n in names if (root / n).exists()])


def make_plan(cfg: Config) -> Plan:
    family = get_family(cfg.model)
    fps = Fingerprints(Path(cfg.cache.dir) / "fingerprints.json")
    vae_fp = _component_fp(fps, family.root, family.vae_components)
    text_fp = _component_fp(fps, family.root, family.text_components)
    denoiser_fp = _component_fp(fps, family.root, [family.denoiser_component])
    fps.save()
    c = cfg.cache
    timestep_settings = [timestep_sampling_settings(cfg), family.timestep_spec()]
    enc = cfg.model.encoder_dtype
    plan = Plan(cfg, family, [], vae_fp, text_fp, denoiser_fp, [])
    for i, concept in enumerate(cfg.concepts):
        if any(p.is_dir() for p in Path(concept.folder).iterdir()):
            warn(f"concepts[{i}].folder: subfolders of '{concept.folder}' are not read (make each a concept)")
        for path, caption in scan_concept(concept, i):
            try:
                if isinstance(caption, BadImage):
                    raise caption
                image_bytes = path.read_bytes()
                width, height = check_header(path)
            except OSError as e:
                plan.skip(path, f"cannot be read ({e.strerror})")
                continue
            except BadImage as e:
                plan.skip(path, str(e))
                continue
            if min(width, height) < cfg.data.resolution:
                warn(f"'{path}' is {width}x{height}, smaller than data.resolution {cfg.data.resolution}: upscaled")
            content = digest("image", sha256_bytes(image_bytes), cfg.data.resolution, PREPARE)
            variants = range(c.variants)
            plan.samples.append(
                Sample(
                    path=path,
                    concept=i,
                    prior=concept.type == "prior",
                    loss_weight=concept.loss_weight,
                    repeats=concept.repeats,
                    caption=caption,
                    content_key=content,
                    latent_key=digest("latent", content, vae_fp, enc),
                    text_key=digest("text", caption, text_fp, cfg.model.max_sequence_length, enc),
                    noise_keys=tuple(digest("noise", content, v, c.seed, timestep_settings) for v in variants),
                    seeds=tuple(derive_seed("noise", c.seed, content, v) for v in variants),
                    timestep_seeds=tuple(derive_seed("timestep", c.seed, content, v) for v in variants),
                )
            )
    if not plan.samples:
        raise UserError("no usable images in any concept (see the warnings above)")
    return plan


def timestep_sampling_settings(cfg: Config) -> dict:
    """Only the settings the chosen scheme uses, so that changing an unused one recomputes nothing."""
    c = cfg.cache
    used = {"uniform": {}, "logit_normal": {"logit_mean": c.logit_mean, "logit_std": c.logit_std},
            "mode": {"mode_scale": c.mode_scale}}[c.timestep_sampling]
    return {"scheme": c.timestep_sampling, **used}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
