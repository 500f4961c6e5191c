"""What a config needs from the cache: every sample with its keys. Both stages build the same plan,
so the train stage finds exactly what the cache stage wrote, and a stale entry is never found.

Key recipes (documented in docs/cache-format.md):
  content   = digest("image", sha256(image file), bucket (height, width), PREPARE)   # one per resolution
  latent[v] = digest("latent", content, vae fingerprint, encoder dtype, flip[v])
              with data.random_crop: digest("latent", content, vae fingerprint, encoder dtype, flip[v], crop[v])
  text[v]   = digest("text", caption[v], text-encoder fingerprint, max_sequence_length, encoder dtype)
  noise[v]  = digest("noise", content, v, cache seed, timestep sampling settings, scheduler table)
  prior[v]  = digest("prior", latent[v], text[v], noise[v], denoiser fingerprint, train dtype, prediction settings,
                     numerics)   # numerics: quantization scheme and settings, library versions, device type
  seed[v]   = derive_seed("noise", cache seed, content, v);  timestep draw seed: derive_seed("timestep", ...)
  flip[v]   = derive_seed("flip", cache seed, content, v) / 2^63 < data.flip_probability
  caption[v] = "" if derive_seed("caption-dropout", cache seed, content, v) / 2^63 < data.caption_dropout,
               else with data.shuffle_tags: shuffle_tags(caption, data.keep_tokens, derive_seed("shuffle-tags", ...))
  crop[v]   = crop_offsets(resized size, bucket, derive_seed("crop", cache seed, content, v))  (data.random_crop)
Flip, caption dropout, tag shuffling and the crop are decided here, per variant (pipeline/data/variants.py),
so a prior's cached prediction is always for exactly the input the training step feeds: the key names the
flipped or cropped latent and the dropped or shuffled caption. With data.resolutions each image is a sample
per resolution (its bucket, so its content key, differs).

The plan also refuses, before any cache work, a prior concept that repeats the subject (same images, same
captions), says once which images have no caption, and holds out a few prior images for the prior drift
score when the config holds out none (data.auto_hold_out).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path


from pipeline import quantize
from pipeline.store.keys import Fingerprints, derive_seed, digest, sha256_file
from pipeline.store.store import Store
from pipeline.config import Config, check_paths
from pipeline.data.images import PREPARE, BadImage, buckets, check_header, cover_size, nearest_bucket, scan_concept
from pipeline.data.draws import Draws, draw_settings
from pipeline.data.variants import crop_offsets, shuffle_tags
from pipeline.errors import UserError, note, warn
from pipeline.families.base import Family
from pipeline.settings import Settings, resolve

BAD_IMAGE = "bad-image"  # store kind: content key -> why that image cannot be decoded


@dataclass(frozen=True)
class Sample:
    path: Path
    concept: int
    prior: bool  # its target is the base model's prediction (a prior concept, or held-out prior images)
    validation: bool  # held out: never trained on, scored every validation.every steps
    loss_weight: float
    repeats: int
    caption: str
    bucket: tuple[int, int]  # (height, width) in pixels
    content_key: str
    # one of each per variant v (epoch e uses v = e mod cache.variants):
    flips: tuple[bool, ...]
    captions: tuple[str, ...]  # the caption, or "" where caption dropout chose this variant
    latent_keys: tuple[str, ...]
    text_keys: tuple[str, ...]
    noise_keys: tuple[str, ...]
    seeds: tuple[int, ...]  # noise seed
    timestep_seeds: tuple[int, ...]
    crops: tuple[tuple[int, int] | None, ...] = ()  # (top, left) in the resized image; None: centred


@dataclass
class Plan:
    cfg: Config
    family: Family
    samples: list[Sample]
    vae_fp: str
    text_fp: str
    denoiser_fp: str
    skipped: list[str]  # "path: reason" for every image left out
    draws: Draws  # the timestep and noise recipe
    bad: set[str] = field(default_factory=set)  # content keys the cache holds an undecodable verdict for
    # what else decides the denoiser's output (pipeline/quantize.py): scheme, library versions, device type
    numerics: dict = field(default_factory=dict)
    missing_captions: list[str] = field(default_factory=list)  # images with no caption file (nor default caption)

    def skip(self, path: Path, reason: str) -> None:
        """Leave one image out (data.on_bad_image = "skip") or stop with a one-line error ("fail")."""
        if self.cfg.data.on_bad_image == "fail":
            raise UserError(f"image '{path}': {reason} (set data.on_bad_image = \"skip\" to leave it out)")
        warn(f"skipping '{path}': {reason}")
        self.skipped.append(f"{path}: {reason}")

    def drop_bad(self, store) -> None:
        """Leave out images the cache stage found it cannot decode (its verdict is cached by content)."""
        keep, said = [], set()  # said: an image of several resolutions (data.resolutions) is named once
        for s in self.samples:
            if store.has(BAD_IMAGE, s.content_key):
                if s.path not in said:
                    self.skip(s.path, store.read(BAD_IMAGE, s.content_key)[1]["reason"])
                said.add(s.path)
                self.bad.add(s.content_key)
            else:
                keep.append(s)
        self.samples = keep
        check_usable(self)

    @property
    def dtype(self) -> str:
        return self.cfg.train.dtype

    @property
    def quantize(self) -> str:
        return self.cfg.model.quantize

    @property
    def numerics_label(self) -> str:
        """The train dtype, and the quantization when there is one: "bf16", "bf16-int8". Priors of each
        are kept side by side, as those of each dtype."""
        return self.dtype if self.quantize == "none" else f"{self.dtype}-{self.quantize}"

    def prior_kind(self) -> str:
        return f"prior/{self.numerics_label}"

    def prior_key(self, sample: Sample, variant: int) -> str:
        return digest(
            "prior", sample.latent_keys[variant], sample.text_keys[variant], sample.noise_keys[variant],
            self.denoiser_fp, self.dtype, self.family.prediction_settings(), self.numerics,
        )

    def text_key(self, caption: str) -> str:
        # a quantized text encoder gives other embeddings: its scheme is in the key (nothing when unquantized,
        # so caches made before the key existed stay valid); offloading moves weights, never changes values
        quantized = self._text_quantization
        return digest("text", caption, self.text_fp, self.family.max_sequence_length, self.cfg.model.encoder_dtype,
                      *([quantized] if quantized else []))

    @functools.cached_property
    def _text_quantization(self) -> dict:
        return quantize.text_encoder_settings(self.cfg.model.text_encoder_quantize)

    @property
    def training(self) -> list[Sample]:
        return [s for s in self.samples if not s.validation]

    @property
    def held_out(self) -> list[Sample]:
        return [s for s in self.samples if s.validation]

    def cached_draws(self) -> list[tuple[Sample, int]]:
        """Every (sample, variant) whose draw is cached: prior samples (one cached prediction each) and
        held-out images. Standard samples draw afresh at every step (pipeline/data/draws.py)."""
        return [(s, v) for s in self.samples if s.prior or s.validation for v in range(self.cfg.cache.variants)]

    def noise_jobs(self) -> dict[str, tuple[Sample, int]]:
        return {s.noise_keys[v]: (s, v) for s, v in self.cached_draws()}

    def latent_jobs(self) -> dict[str, tuple[Sample, int]]:
        """latent key -> (sample, a variant with that latent): each distinct latent once."""
        return {k: (s, v) for s in self.samples for v, k in reversed(list(enumerate(s.latent_keys)))}

    def text_jobs(self) -> dict[str, str]:
        """text key -> caption: each distinct caption once (the empty one too), validation prompts included."""
        jobs = {k: c for s in self.samples for k, c in zip(s.text_keys, s.captions)}
        prompts = self.cfg.validation.prompts
        jobs.update({self.text_key(p): p for p in [*prompts, ""] if prompts})  # "": the negative, for guidance
        return jobs

    def bucket_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.samples:
            label = f"{s.bucket[1]}x{s.bucket[0]}"  # width x height, as people say sizes
            counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))

    def data_fp(self) -> str:
        """What the training images, captions and their draws amount to (content, not paths): a checkpoint
        records it so that --resume refuses a data set that changed under the same config."""
        return digest("data", [[s.content_key, s.concept, s.prior, s.loss_weight, s.repeats, s.latent_keys,
                                s.text_keys] for s in self.training])


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # loading these runs pickle: code from the file


def _component_fp(fps: Fingerprints, root: Path, names) -> str:
    for n in names:
        folder = root / n
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_WEIGHTS)
            if pickled:
                raise UserError(f"model.path: '{pickled[0]}' holds pickle weights, which are never loaded here (they "
                                "can run code): use the model's .safetensors files")
    return digest([[n, fps.folder(root / n)] for n in names if (root / n).exists()])


def _denoiser_fp(fps: Fingerprints, family: Family) -> str:
    if family.denoiser_file is None:
        weights = _component_fp(fps, family.root, [family.denoiser_component])
    else:
        # model.denoiser_file: the weights are that file's; the folder gives only the config
        config = family.root / family.denoiser_component / "config.json"
        weights = digest([["file", fps.file(family.denoiser_file)], ["config", fps.file(config)]])
    adapter = getattr(family, "training_adapter", None)
    # model.training_adapter is merged into those weights; without one the fingerprint is the weights' alone
    return weights if adapter is None else digest([["weights", weights], ["training adapter", fps.file(adapter)]])


def model_fingerprints(fps: Fingerprints, family: Family) -> dict[str, str]:
    """The fingerprints of what the entries are computed with: the VAE, the text encoders, the denoiser."""
    return {"vae": _component_fp(fps, family.root, family.vae_components),
            "text encoders": _component_fp(fps, family.root, family.text_components),
            "denoiser": _denoiser_fp(fps, family)}


def open_plan(cfg: Config, settings: Settings | None = None):
    """How every command starts: the paths checked, the plan, and its cache's store, with the images the
    cache holds undecodable verdicts for left out (plan.bad). check_paths comes first: with a missing model
    or image folder the plan would have other keys, and a prune would take every entry for unused.
    settings: what the stage resolved (settings.resolve); else resolved here."""
    check_paths(cfg)
    plan = make_plan(cfg, settings)
    store = Store(cfg.cache.dir)
    plan.drop_bad(store)
    return plan, store


def make_plan(cfg: Config, settings: Settings | None = None) -> Plan:
    settings = settings or resolve(cfg)
    family = settings.family
    fps = Fingerprints(Path(cfg.cache.dir) / "fingerprints.json")
    vae_fp, text_fp, denoiser_fp = model_fingerprints(fps, family).values()
    fps.save()
    c, d = cfg.cache, cfg.data
    timestep_settings = [draw_settings(cfg, family), family.timestep_spec()]
    enc = cfg.model.encoder_dtype
    plan = Plan(cfg, family, [], vae_fp, text_fp, denoiser_fp, [], Draws(cfg, family), numerics=settings.numerics)
    sizes = [buckets(r, family.pixel_multiple, d.buckets) for r in d.resolutions or [d.resolution]]

    def chance(what: str, content: str, v: int) -> float:
        return derive_seed(what, c.seed, content, v) / 2**63

    def caption_of(caption: str, content: str, v: int) -> str:
        if chance("caption-dropout", content, v) < d.caption_dropout:
            return ""
        seed = derive_seed("shuffle-tags", c.seed, content, v)
        return shuffle_tags(caption, d.keep_tokens, seed) if d.shuffle_tags else caption
    upscaled: list[str] = []  # said once, with a count: a data set of small images would print a line each
    missing: list[tuple[int, Path]] = []  # (concept, image) without a caption file: said once, before any hashing
    scanned = []
    for i, concept in enumerate(cfg.concepts):
        found: list[Path] = []
        scanned.append(scan_concept(concept, i, found))
        missing += [(i, p) for p in found]
    _say_missing_captions(plan, missing)
    image_shas: dict[Path, str] = {}
    for i, concept in enumerate(cfg.concepts):
        if any(p.is_dir() for p in Path(concept.folder).iterdir()):
            warn(f"concepts[{i}].folder: subfolders of '{concept.folder}' are not read (make each a concept)")
        for path, caption in scanned[i]:
            try:
                if isinstance(caption, BadImage):
                    raise caption
                # hashed as it streams: a file is never held whole in memory (a valid header may carry a
                # tail of gigabytes); the decoder opens the file and reads what it needs
                image_sha = sha256_file(path)
                width, height = check_header(path)
            except OSError as e:
                plan.skip(path, f"cannot be read ({e.strerror})")
                continue
            except BadImage as e:
                plan.skip(path, str(e))
                continue
            # one bucket per resolution (data.resolutions), each once
            chosen = list(dict.fromkeys(nearest_bucket(width, height, options) for options in sizes))
            try:  # refused here, by name, before anything is decoded
                resized = {bucket: cover_size(width, height, bucket) for bucket in chosen}
            except BadImage as e:
                plan.skip(path, str(e))
                continue
            image_shas[path] = image_sha
            for bucket in chosen:
                if width < bucket[1] or height < bucket[0]:
                    upscaled.append(f"'{path}' is {width}x{height}, smaller than its {bucket[1]}x{bucket[0]} bucket")
                content = digest("image", image_sha, bucket, PREPARE)
                variants = range(c.variants)
                flips = tuple(chance("flip", content, v) < d.flip_probability for v in variants)
                captions = tuple(caption_of(caption, content, v) for v in variants)
                crops = tuple(crop_offsets(resized[bucket], bucket, derive_seed("crop", c.seed, content, v))
                              if d.random_crop else None for v in variants)
                plan.samples.append(
                    Sample(
                        path=path,
                        concept=i,
                        prior=concept.type == "prior" or concept.prior,
                        validation=concept.type == "validation",
                        loss_weight=concept.loss_weight,
                        repeats=concept.repeats,
                        caption=caption,
                        bucket=bucket,
                        content_key=content,
                        flips=flips,
                        captions=captions,
                        latent_keys=tuple(digest("latent", content, vae_fp, enc, f, *([] if crop is None else [crop]))
                                          for f, crop in zip(flips, crops)),
                        text_keys=tuple(plan.text_key(t) for t in captions),
                        noise_keys=tuple(digest("noise", content, v, c.seed, timestep_settings) for v in variants),
                        seeds=tuple(derive_seed("noise", c.seed, content, v) for v in variants),
                        timestep_seeds=tuple(derive_seed("timestep", c.seed, content, v) for v in variants),
                        crops=crops,
                    )
                )
    if upscaled:
        more = f" (and {len(upscaled) - 1} more image(s) smaller than their bucket)" if len(upscaled) > 1 else ""
        warn(f"{upscaled[0]}: upscaled{more}")
    refuse_prior_like_subject(plan)
    hold_out_priors(plan, image_shas)
    check_usable(plan)
    return plan


def check_usable(plan: Plan) -> None:
    if not plan.training:
        raise UserError("no usable images in any concept (see the warnings above)")
    if all(s.prior for s in plan.training):
        raise UserError("no usable images in any standard concept (see the warnings above): training would learn "
                        "nothing; fix or replace the standard concept's images")


SHOWN = 3  # images named in a warning about many; the rest are counted


def _say_missing_captions(plan: Plan, missing: list[tuple[int, Path]]) -> None:
    """Images with no caption file (and no default_caption) train with an empty caption: one warning naming
    the first few and counting all (data.on_missing_caption = "warn"), or a one-line error ("fail")."""
    if not missing:
        return
    plan.missing_captions = [str(p) for _, p in missing]
    (i, first), more = missing[0], len(missing) - 1
    ext = plan.cfg.concepts[i].caption_ext
    if plan.cfg.data.on_missing_caption == "fail":
        others = f" and {more} more image(s) have none" if more else ""
        raise UserError(f"image '{first}' has no caption file ('{first.stem}{ext}'){others}: write them, set "
                        f"concepts[{i}].default_caption, or data.on_missing_caption = \"warn\" to train them uncaptioned")
    shown = ", ".join(f"'{p}'" for _, p in missing[:SHOWN])
    rest = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
    warn(f"{len(missing)} image(s) have no caption file and train with an empty caption: {shown}{rest} (write "
         f"'<name>{ext}' beside each, or set the concept's default_caption; data.on_missing_caption = \"fail\" stops)")


def refuse_prior_like_subject(plan: Plan) -> None:
    """A prior concept whose every image, with the same caption, is also in a standard concept would pull
    those samples toward the base model while the standard one pulls them toward the subject: contradictory
    targets, and priors computed for nothing. Refused here, before the cache stage computes anything."""
    pairs: dict[int, set] = {}
    for s in plan.samples:
        pairs.setdefault(s.concept, set()).add((s.content_key, s.caption))
    concepts = plan.cfg.concepts
    for p, prior in enumerate(concepts):
        for i, subject in enumerate(concepts):
            if prior.type == "prior" and subject.type == "standard" and p in pairs and pairs[p] <= pairs.get(i, set()):
                raise UserError(
                    f"concepts[{p}] (type = \"prior\", folder '{prior.folder}') holds the same images with the same "
                    f"captions as concepts[{i}] (folder '{subject.folder}'): its targets would hold the subject at the "
                    "base model; make the prior concept other images of the class with their own simple captions")


HOLD_OUT_LEAST = 2  # images held out of a prior concept by data.auto_hold_out
HOLD_OUT_LEFT = 10  # ... only while this many are left to train on


def hold_out_priors(plan: Plan, image_shas: dict[Path, str]) -> None:
    """Without held-out prior images in the config (a validation concept with prior = true), hold out
    data.auto_hold_out of each prior concept's images (at least HOLD_OUT_LEAST, and only while HOLD_OUT_LEFT
    remain), so that a run reports its prior drift. The images are chosen by their content's hash, not by
    name or listing order, so every run of the config holds out the same ones and finds them cached: a
    held-out prior image needs the same cached draws and prediction as a trained one."""
    cfg = plan.cfg
    if not cfg.data.auto_hold_out or any(c.type == "validation" and c.prior for c in cfg.concepts):
        return
    said = []
    for i, concept in enumerate(cfg.concepts):
        # by image, not sample: with data.resolutions an image is a sample per resolution, held out in all
        mine = sorted({s.path for s in plan.samples if s.concept == i and concept.type == "prior"},
                      key=lambda p: (image_shas[p], str(p)))
        count = max(HOLD_OUT_LEAST, round(cfg.data.auto_hold_out * len(mine)))
        if len(mine) - count < HOLD_OUT_LEFT:
            continue
        chosen = set(mine[:count])
        plan.samples = [replace(s, validation=True) if s.concept == i and s.path in chosen else s for s in plan.samples]
        said.append(f"{count} of the {len(mine)} images of concepts[{i}] ('{concept.folder}')")
    if said:
        note(f"data.auto_hold_out: held out {' and '.join(said)} to score prior drift; they are not trained on "
             "(data.auto_hold_out = 0 trains on all)")
