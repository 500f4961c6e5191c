"""The TOML config: nested tables into frozen dataclasses; unknown keys and wrong types are errors.

Relative paths are resolved against the folder of the config file, so a config means the same thing
from whatever directory it is run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pipeline.errors import UserError
from pipeline.families import FAMILIES, tiny_module  # the registry alone: no model library

DTYPES = ("bf16", "fp16", "fp32")
QUANTIZE = ("none", "int8", "fp8", "nf4")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TARGET_PRESETS = ("attention", "attention_mlp", "all_linear")  # every family defines these (target_presets)
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ModelConfig:
    path: str  # a local diffusers folder or a hub id
    family: str = "auto"  # "auto" reads model_index.json
    guidance: float = 1.0  # guidance-embedding value for guidance-distilled models (Flux.1-dev)
    max_sequence_length: int = 0  # T5 (and Llama) tokens per caption; 0: the family's own (see docs/config.md)
    encoder_dtype: str = "fp32"  # dtype the VAE and text encoders run in at cache time
    denoiser_file: str = ""  # a single-file (.safetensors) denoiser checkpoint used instead of the folder's weights
    prediction_type: str = ""  # epsilon/v models: "epsilon" | "v_prediction" when the scheduler config says otherwise; "": its own
    quantize: str = "none"  # the frozen denoiser's weights: "none" | "int8" | "fp8" (torchao) | "nf4" (bitsandbytes, CUDA)
    # a LoRA (.safetensors) merged into the frozen denoiser in both stages, never saved with the trained one: a
    # distilled model's de-distillation training adapter (Z-Image-Turbo's); its file keys the priors
    training_adapter: str = ""
    # the cache stage's text encoders: quantized as they load (the same schemes), and/or their layers kept on
    # the CPU and moved to the device as they run
    text_encoder_quantize: str = "none"
    text_encoder_offload: bool = False


@dataclass(frozen=True)
class ConceptConfig:
    folder: str
    type: str = "standard"  # "standard" | "prior" | "validation" (held out: never trained on, scored every N steps)
    prior: bool = False  # validation concepts only: held-out prior images, scored as prior drift
    caption_ext: str = ".txt"
    default_caption: str = ""  # used for images without a caption file
    repeats: int = 1
    loss_weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    resolution: int = 512  # side of the square whose area the buckets keep (and the square without buckets)
    buckets: bool = True  # aspect-ratio buckets; false: every image is resized and centre-cropped to a square
    flip_probability: float = 0.0  # per variant, drawn at cache time: the image is mirrored left-right
    caption_dropout: float = 0.0  # per variant, drawn at cache time: the caption is replaced by ""
    on_bad_image: str = "skip"  # "skip": warn, leave the image out, list it in the summary; "fail": stop
    prior_ratio: float = 0.0  # share of prior samples per epoch; 0: as the data (with repeats) gives
    on_missing_caption: str = "warn"  # an image with no caption file nor default_caption: "warn" (once, for all), "fail"
    # with no held-out prior images (a validation concept with prior = true), this share of each prior concept
    # (at least 2 images, while 10 are left to train) is held out to score prior drift; 0: none
    auto_hold_out: float = 0.05
    # several resolutions at once: each image cached (and trained on) at each, with its buckets; instead
    # of `resolution`, which then reads as the largest (memory estimate, sample size)
    resolutions: list[int] = field(default_factory=list)
    shuffle_tags: bool = False  # per variant, drawn at cache time: the caption's comma-separated tags shuffled
    keep_tokens: int = 0  # with shuffle_tags: this many leading tags keep their place (kohya's keep_tokens)
    random_crop: bool = False  # per variant, drawn at cache time: a random crop instead of the centre crop


@dataclass(frozen=True)
class CacheConfig:
    dir: str = "cache"
    variants: int = 4  # noise/timestep draws per sample; epoch e uses variant e mod variants
    seed: int = 0
    batch_size: int = 4
    # finished batches are gathered into one segment file until they hold this many MiB of arrays (0: a
    # file per batch) or the first is this many seconds old: fewer files, at most that much work lost
    segment_mb: float = 256.0
    segment_seconds: float = 120.0
    timestep_sampling: str = "auto"  # "uniform" | "logit_normal" | "mode" (SD3 paper); auto: the family's
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 0.0  # flow models: a fixed timestep shift s (sigma -> s*sigma / (1 + (s-1)*sigma)); 0: the model's own
    dynamic_shift: bool = False  # flow models: shift by each image's size, as Flux's scheduler does at inference
    noise_offset: float = 0.0  # noise += noise_offset * randn(C, 1, 1): lets the model learn brightness
    input_perturbation: float = 0.0  # the input's noise gets perturbation * randn more; the target does not
    device: str = "auto"
    # under a launcher (several processes): how long a rank waits at a barrier for the others before the run
    # stops naming the late ones. Long: the ranks share each phase's work but may finish it minutes apart
    rank_timeout_minutes: float = 60.0


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention"  # the family's preset: "attention" | "attention_mlp" | "all_linear"
    target_modules: list[str] = field(default_factory=list)  # module-name suffixes; non-empty: wins over targets
    target_regex: str = ""  # a regex full-matching module names (as peft does); non-empty: wins over both
    dropout: float = 0.0
    use_dora: bool = False  # weight-decomposed LoRA (peft)
    init: str = "default"  # "default" (B = 0, A Kaiming) | "gaussian" (B = 0, A Gaussian)
    # the adapter (peft): "lora" | "lokr" (Kronecker product) | "loha" (Hadamard product); each starts at zero
    type: str = "lora"
    lokr_factor: int = -1  # lokr: one Kronecker factor's size where it divides the width; -1: near square


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # "adamw" | "adamw8bit" (bitsandbytes, CUDA) | "prodigy" | "adafactor"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"  # any name of diffusers' get_scheduler: constant, linear, cosine, ...
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping


@dataclass(frozen=True)
class TrainConfig:
    dtype: str = "bf16"  # weights of the frozen denoiser; the priors are cached per this dtype
    batch_size: int = 1
    epochs: int = 1
    max_steps: int = 0  # 0: run all epochs
    seed: int = 0
    output_dir: str = "output"
    lora_name: str = "pytorch_lora_weights.safetensors"
    lora_format: str = "diffusers"  # "diffusers" (peft keys) | "kohya" (sd-scripts' layout: ComfyUI, Forge)
    prior_mode: str = "cached"  # "online" recomputes the prior target with a second forward (peers' way)
    device: str = "auto"
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: none); --resume goes on from the newest
    keep_checkpoints: int = 3  # the newest this many are kept (0: all)
    gradient_accumulation: int = 1  # batches per optimizer step
    gradient_checkpointing: bool = False
    blocks_to_swap: int = 0  # transformer blocks whose frozen weights wait in CPU memory (both stages; see pipeline/denoiser/swap.py)
    fsdp: bool = False  # under a launcher, shard the frozen weights across the processes (FSDP2; see pipeline/denoiser/shard.py)
    tensorboard: bool = False  # also log to <output_dir>/tensorboard (pip install 'prior-lora[tensorboard]')
    loss_weighting: str = "none"  # "none" | "sigma_sqrt" | "cosmap" (flow models) | "min_snr" (epsilon/v models)
    min_snr_gamma: float = 5.0
    ema: bool = False  # also keep an EMA of the LoRA weights (diffusers' EMAModel), saved as <lora stem>-ema
    ema_decay: float = 0.999  # its largest decay; diffusers' EMAModel ramps up to it: (1+n)/(10+n) at step n
    # "lora" (the adapter of [lora]) | "full": the denoiser's own weights train (pipeline/train/full.py)
    method: str = "lora"
    # full: the parameters that train, as glob patterns over their dotted names (a pattern naming a module
    # takes its parameters: "transformer_blocks.*", "down_blocks.1"); empty: all of them
    full_train_modules: list[str] = field(default_factory=list)
    # full with bf16/fp16 weights: an fp32 copy of the trained weights that the optimizer updates (4 more
    # bytes a weight); off (bf16): each update is rounded stochastically into the bf16 weights
    master_weights: bool = False
    fused_backward: bool = False  # full: each weight's optimizer step as its gradient is ready, then freed
    max_shard_size: str = "5GB"  # full: the saved denoiser's safetensors shards (save_pretrained)
    extract_rank: int = 0  # full: also write the difference to the base as a LoRA of this rank (0: none)


@dataclass(frozen=True)
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)  # rendered with the current LoRA every `every` steps
    every: int = 0  # optimizer steps between validations (prompts, validation concepts); 0: only at the end
    steps: int = 20  # denoising steps per image
    guidance_scale: float = 3.5  # the pipeline's guidance_scale (Flux-dev: the embedded guidance)
    seed: int = 0
    width: int = 0  # 0: data.resolution
    height: int = 0
    # after the run, train it again with every prior concept at loss weight 0 (<output_dir>/without-priors)
    # and render both side by side (<output_dir>/comparison.png); see pipeline/train/comparison.py
    compare_without_priors: bool = False


@dataclass(frozen=True)
class EmbeddedConfig:
    family: str = "flux"  # build this tiny random-weight model and synthetic data where missing
    preset: str = "default"


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    concepts: list[ConceptConfig]
    data: DataConfig = DataConfig()
    cache: CacheConfig = CacheConfig()
    lora: LoraConfig = LoraConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    validation: ValidationConfig = ValidationConfig()
    embedded: EmbeddedConfig | None = None
    source: str = ""  # the config file (not a TOML key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def portable_json(self) -> str:
        """The config with local paths relative to the config file's folder, as written in it: what goes
        into a LoRA file, which users share, so that it carries no absolute paths of this machine."""
        base = Path(self.source).parent if self.source else Path.cwd()

        def rel(p: str) -> str:
            return os.path.relpath(p, base) if Path(p).is_absolute() else p

        d = self.to_dict()
        d["source"] = Path(self.source).name
        d["model"]["path"] = rel(self.model.path)
        d["model"]["denoiser_file"] = rel(self.model.denoiser_file) if self.model.denoiser_file else ""
        d["model"]["training_adapter"] = rel(self.model.training_adapter) if self.model.training_adapter else ""
        d["cache"]["dir"] = rel(self.cache.dir)
        d["train"]["output_dir"] = rel(self.train.output_dir)
        for c in d["concepts"]:
            c["folder"] = rel(c["folder"])
        return json.dumps(d, sort_keys=True)


def changed_keys(old: dict, new: dict, prefixes: tuple[str, ...]) -> list[str]:
    """Each dotted key under `prefixes` whose value differs between two configs as dicts (to_dict or
    portable_json's), as "key old -> new" (JSON values; "(absent)" where one has no such key)."""
    def flat(value, key=""):
        if isinstance(value, dict):
            return {k: v for name, item in value.items()
                    for k, v in flat(item, f"{key}.{name}" if key else name).items()}
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # [[concepts]]
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{key}[{i}]").items()}
        return {key: value}

    a, b = flat(old), flat(new)
    # a key the old config lacks (written before the key existed) had its default's behaviour then
    a.update({k: d for k in b.keys() - a.keys() if (d := field_default(k)) is not dataclasses.MISSING})
    shown = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"  # noqa: E731
    return [f"{k} {shown(a, k)} -> {shown(b, k)}" for k in sorted(a.keys() | b.keys())
            if k.startswith(prefixes) and a.get(k, ...) != b.get(k, ...)]


def field_default(key: str):
    """The default of a dotted config key ("train.ema", "concepts[2].repeats") as to_dict gives it, or
    dataclasses.MISSING where it has none."""
    cls = Config
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    for i, part in enumerate(parts):
        field = next((f for f in dataclasses.fields(cls) if f.name == part), None)
        if field is None:
            return dataclasses.MISSING
        if i == len(parts) - 1:
            if field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                return dataclasses.MISSING
            return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else json.loads(json.dumps(value))
        hint = typing.get_type_hints(cls)[part]
        while typing.get_origin(hint) in (list, typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if not dataclasses.is_dataclass(hint):
            return dataclasses.MISSING
        cls = hint
    return dataclasses.MISSING


def _check_type(value, hint, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check_type(value, args[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a table")
        return _build(hint, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key '{key}' must be a finite number, got {value}")
    if hint is int and isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise UserError(f"config key '{key}' is out of range (a 64-bit integer), got {value}")
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise UserError(f"config key '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, table: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"source"}
    for k in table:
        if k not in names:
            raise UserError(f"unknown config key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in table:
            kwargs[f.name] = _check_type(table[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name != "source":
            raise UserError(f"missing config key '{prefix}{f.name}'")
    return cls(**kwargs)


def _choice(value, allowed, key):
    if value not in allowed:
        raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")


def _positive(value, key, zero_ok=False):
    if value < 0 or (value == 0 and not zero_ok):
        raise UserError(f"config key '{key}' must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def _one_resolution_key(cfg: Config, data: dict) -> Config:
    """data.resolutions replaces data.resolution, which then reads as the largest of them (what the memory
    estimate and sample grids use): a file giving both is refused, as it is unclear which it means."""
    if not cfg.data.resolutions:
        return cfg
    if "resolution" in data:
        raise UserError("config keys 'data.resolution' and 'data.resolutions' exclude each other: set one")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=max(cfg.data.resolutions)))


def _resolve(base: Path, p: str, key: str = "path") -> str:
    """A path from the config: `~` and `$VAR`/`${VAR}` expanded, then relative to the config's folder."""
    expanded = os.path.expandvars(os.path.expanduser(p))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise UserError(f"config key '{key}': '{p}' uses ${unset.group(1)}, which is not set in the environment")
    path = Path(expanded)
    return str(path if path.is_absolute() else (base / path).resolve())


def load_config(path: str | Path, dtype: str | None = None) -> Config:
    """Read and validate a config file. Raises UserError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM some editors write is skipped
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    try:
        cfg = _build(Config, raw)
        cfg = _one_resolution_key(cfg, raw.get("data", {}))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    base = path.resolve().parent
    model_path = cfg.model.path
    try:
        if not HUB_ID.match(model_path) or Path(base / model_path).exists():
            model_path = _resolve(base, model_path, "model.path")
        cfg = dataclasses.replace(
            cfg,
            source=str(path.resolve()),
            model=dataclasses.replace(cfg.model, path=model_path, denoiser_file=cfg.model.denoiser_file
                                      and _resolve(base, cfg.model.denoiser_file, "model.denoiser_file"),
                                      training_adapter=cfg.model.training_adapter
                                      and _resolve(base, cfg.model.training_adapter, "model.training_adapter")),
            concepts=[dataclasses.replace(c, folder=_resolve(base, c.folder, f"concepts[{i}].folder"))
                      for i, c in enumerate(cfg.concepts)],
            cache=dataclasses.replace(cfg.cache, dir=_resolve(base, cfg.cache.dir, "cache.dir")),
            train=dataclasses.replace(cfg.train, output_dir=_resolve(base, cfg.train.output_dir, "train.output_dir")),
        )
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if dtype is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype=dtype))
    try:
        validate(cfg)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return cfg


def _adapter_type(cfg: Config) -> None:
    """lora.type and the keys that only one adapter type takes."""
    lora, kind = cfg.lora, cfg.lora.type
    _choice(kind, ("lora", "lokr", "loha"), "lora.type")
    if not isinstance(lora.lokr_factor, int) or isinstance(lora.lokr_factor, bool) or not (
            lora.lokr_factor == -1 or lora.lokr_factor >= 1):
        raise UserError(f"config key 'lora.lokr_factor' must be -1 (near-square factors) or a positive integer, "
                        f"got {lora.lokr_factor!r}")
    if lora.lokr_factor != -1 and kind != "lokr":
        raise UserError(f"config key 'lora.lokr_factor' is for lora.type = \"lokr\" (got lora.type = {kind!r})")
    if kind == "lora":
        if cfg.train.lora_format == "lycoris":
            raise UserError("config key 'train.lora_format' = \"lycoris\" is for lora.type = \"lokr\" or \"loha\"; "
                            "a LoRA's ComfyUI layout is train.lora_format = \"kohya\"")
        return
    for key, off, value in (("lora.use_dora", False, lora.use_dora), ("lora.init", "default", lora.init),
                            ("lora.dropout", 0.0, lora.dropout)):
        if value != off:  # LoRA's own options: peft's LoKr and LoHa have no such thing
            raise UserError(f"config key '{key}' = {json.dumps(value)} is for lora.type = \"lora\" only "
                            f"(got lora.type = {kind!r}): set it back to {json.dumps(off)}")
    if cfg.model.quantize == "nf4":
        # peft wraps bitsandbytes' 4-bit Linear as a plain one for LoKr/LoHa: its packed weight has another shape
        raise UserError(f"config key 'model.quantize' = \"nf4\" works with lora.type = \"lora\" only (got "
                        f"{kind!r}): use \"int8\" or \"fp8\", or a LoRA")
    if cfg.train.lora_format == "kohya":
        raise UserError(f"config key 'train.lora_format' = \"kohya\" holds LoRA's down/up pairs only, no {kind} "
                        f"(lora.type = {kind!r}): use \"lycoris\" (ComfyUI) or \"diffusers\"")


def _method(cfg: Config) -> None:
    """train.method and the keys that only one method takes."""
    t = cfg.train
    _choice(t.method, ("lora", "full"), "train.method")
    defaults = TrainConfig()
    full_only = ("full_train_modules", "master_weights", "fused_backward", "max_shard_size", "extract_rank")
    if t.method == "lora":
        for key in full_only:
            if getattr(t, key) != getattr(defaults, key):
                raise UserError(f"config key 'train.{key}' is for train.method = \"full\": set train.method = "
                                "\"full\", or leave the key out")
        return
    if t.prior_mode == "online":
        raise UserError("config key 'train.prior_mode' = \"online\" does not work with train.method = \"full\": there "
                        "is no second copy of the base to ask (use \"cached\": the cache holds its predictions)")
    if cfg.model.quantize != "none":
        raise UserError(f"config key 'model.quantize' = {cfg.model.quantize!r} does not work with train.method = "
                        "\"full\": the quantized weights are the ones that would train (set \"none\")")
    if cfg.lora != LoraConfig():
        changed = next(f.name for f in dataclasses.fields(LoraConfig)
                       if getattr(cfg.lora, f.name) != getattr(LoraConfig(), f.name))
        raise UserError(f"config key 'lora.{changed}' is for train.method = \"lora\": with \"full\" there is no "
                        "adapter (leave [lora] out)")
    for key in ("lora_format", "lora_name", "ema"):
        if getattr(t, key) != getattr(defaults, key):
            raise UserError(f"config key 'train.{key}' is for train.method = \"lora\": with \"full\" the output "
                            "is the denoiser itself (leave the key out)")
    if t.dtype == "fp16" and not t.master_weights:
        raise UserError("config key 'train.dtype' = \"fp16\" with train.method = \"full\" needs "
                        "train.master_weights = true (stochastic rounding is for bf16)")
    if t.fused_backward and cfg.optimizer.max_grad_norm > 0:
        raise UserError("config key 'train.fused_backward' steps each weight before the others have a gradient, "
                        "so nothing can clip their total norm: set optimizer.max_grad_norm = 0")
    if cfg.optimizer.name == "prodigy":
        # each weight is stepped on its own (train/full.py), and Prodigy's step size is an estimate over all
        raise UserError("config key 'optimizer.name' = \"prodigy\" does not work with train.method = \"full\", "
                        "whose weights step one at a time: use \"adamw\", \"adamw8bit\" or \"adafactor\"")
    if t.extract_rank < 0:
        raise UserError(f"config key 'train.extract_rank' must be >= 0, got {t.extract_rank}")
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMG]?B", t.max_shard_size):
        raise UserError(f"config key 'train.max_shard_size' must be a size such as \"5GB\" or \"500MB\", got "
                        f"{t.max_shard_size!r}")


def validate(cfg: Config) -> None:
    """Value checks that do not touch the disk (paths are checked where they are used)."""
    _choice(cfg.train.dtype, DTYPES, "train.dtype")
    _choice(cfg.model.encoder_dtype, DTYPES, "model.encoder_dtype")
    _choice(cfg.train.prior_mode, ("cached", "online"), "train.prior_mode")
    _choice(cfg.optimizer.name, ("adamw", "adamw8bit", "prodigy", "adafactor"), "optimizer.name")
    _choice(cfg.optimizer.scheduler, SCHEDULERS, "optimizer.scheduler")
    _choice(cfg.train.loss_weighting, ("none", "sigma_sqrt", "cosmap", "min_snr"), "train.loss_weighting")
    _choice(cfg.lora.init, ("default", "gaussian"), "lora.init")
    _choice(cfg.lora.targets, TARGET_PRESETS, "lora.targets")
    _choice(cfg.train.lora_format, ("diffusers", "kohya", "lycoris"), "train.lora_format")
    _adapter_type(cfg)
    _method(cfg)
    _choice(cfg.model.prediction_type, ("", "epsilon", "v_prediction"), "model.prediction_type")
    _choice(cfg.model.quantize, QUANTIZE, "model.quantize")
    _choice(cfg.model.text_encoder_quantize, QUANTIZE, "model.text_encoder_quantize")
    if cfg.model.text_encoder_quantize != "none" and cfg.model.text_encoder_offload:
        # accelerate's offload hooks move plain tensors; quantized weights are tensor subclasses or bitsandbytes'
        # packed parameters, and a quantized encoder is what fits without offloading
        raise UserError(f"config key 'model.text_encoder_offload' works with model.text_encoder_quantize = \"none\" "
                        f"only (got {cfg.model.text_encoder_quantize!r}): set one of them")
    if cfg.model.quantize != "none" and cfg.train.blocks_to_swap:
        # the swap moves plain tensors by .data; quantized weights are tensor subclasses (torchao) or carry
        # a separate quantization state (bitsandbytes), and at 1 byte or less per weight they fit without it
        raise UserError(f"config key 'train.blocks_to_swap' works with model.quantize = \"none\" only (got "
                        f"{cfg.model.quantize!r}): set one of them (python -m pipeline plan-memory shows what fits)")
    if cfg.lora.target_regex:
        try:
            re.compile(cfg.lora.target_regex)
        except re.error as e:
            raise UserError(f"config key 'lora.target_regex' is not a valid regular expression: {e}") from None
    _choice(cfg.data.on_bad_image, ("skip", "fail"), "data.on_bad_image")
    _choice(cfg.data.on_missing_caption, ("warn", "fail"), "data.on_missing_caption")
    if not 0 <= cfg.data.auto_hold_out < 1:
        raise UserError(f"config key 'data.auto_hold_out' must be a share from 0 (off) to below 1, got {cfg.data.auto_hold_out}")
    _choice(cfg.cache.timestep_sampling, ("auto", "uniform", "logit_normal", "mode"), "cache.timestep_sampling")
    if cfg.cache.shift and cfg.cache.dynamic_shift:
        raise UserError("config keys 'cache.shift' and 'cache.dynamic_shift' exclude each other: set one")
    if not cfg.concepts:
        raise UserError("config needs at least one [[concepts]] table")
    for i, c in enumerate(cfg.concepts):
        _choice(c.type, ("standard", "prior", "validation"), f"concepts[{i}].type")
        if c.prior and c.type != "validation":
            raise UserError(f"config key 'concepts[{i}].prior' is for validation concepts (a prior concept is type = \"prior\")")
        _positive(c.repeats, f"concepts[{i}].repeats")
        _positive(c.loss_weight, f"concepts[{i}].loss_weight", zero_ok=True)
    if cfg.validation.compare_without_priors and not any(c.type == "prior" and c.loss_weight > 0 for c in cfg.concepts):
        raise UserError("config key 'validation.compare_without_priors' compares a run with its prior concepts to one "
                        "without them: add a [[concepts]] table with type = \"prior\" (loss_weight above 0)")
    if not any(c.type == "standard" for c in cfg.concepts):
        # prior concepts hold the model where it is and validation ones only score it: alone, nothing is learnt
        raise UserError("config has no standard concept, so there is nothing to learn: add a [[concepts]] table with "
                        "your subject's images (type = \"standard\", the default) beside the prior and validation ones")
    for key, value, zero_ok in [
        ("data.resolution", cfg.data.resolution, False),
        ("cache.variants", cfg.cache.variants, False),
        ("cache.batch_size", cfg.cache.batch_size, False),
        ("cache.segment_mb", cfg.cache.segment_mb, True),
        ("cache.segment_seconds", cfg.cache.segment_seconds, False),
        ("cache.rank_timeout_minutes", cfg.cache.rank_timeout_minutes, False),
        ("train.batch_size", cfg.train.batch_size, False),
        ("train.epochs", cfg.train.epochs, False),
        ("train.max_steps", cfg.train.max_steps, True),
        ("lora.rank", cfg.lora.rank, False),
        ("optimizer.lr", cfg.optimizer.lr, False),
        ("model.max_sequence_length", cfg.model.max_sequence_length, True),
        ("cache.shift", cfg.cache.shift, True),
        ("cache.noise_offset", cfg.cache.noise_offset, True),
        ("cache.input_perturbation", cfg.cache.input_perturbation, True),
        ("optimizer.warmup_steps", cfg.optimizer.warmup_steps, True),
        ("optimizer.max_grad_norm", cfg.optimizer.max_grad_norm, True),
        ("train.gradient_accumulation", cfg.train.gradient_accumulation, False),
        ("train.checkpoint_every", cfg.train.checkpoint_every, True),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints, True),
        ("lora.dropout", cfg.lora.dropout, True),
        ("data.prior_ratio", cfg.data.prior_ratio, True),
        ("validation.every", cfg.validation.every, True),
        ("validation.steps", cfg.validation.steps, False),
        ("validation.width", cfg.validation.width, True),
        ("validation.height", cfg.validation.height, True),
        ("train.min_snr_gamma", cfg.train.min_snr_gamma, False),
        ("train.blocks_to_swap", cfg.train.blocks_to_swap, True),
        ("data.keep_tokens", cfg.data.keep_tokens, True),
        *((f"data.resolutions[{i}]", r, False) for i, r in enumerate(cfg.data.resolutions)),
    ]:
        _positive(value, key, zero_ok)
    for key, value in (("cache.device", cfg.cache.device), ("train.device", cfg.train.device)):
        if not DEVICE.match(value):
            raise UserError(f"config key '{key}' must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        _check_device_exists(key, value)
    if cfg.model.quantize == "nf4":  # before anything imports bitsandbytes (torch only for this value)
        from pipeline.quantize import check_config

        check_config(cfg.model.quantize, {"cache.device": cfg.cache.device, "train.device": cfg.train.device})
    if cfg.model.text_encoder_quantize == "nf4":  # only the cache stage runs the text encoders
        from pipeline.quantize import check_config

        check_config("nf4", {"cache.device": cfg.cache.device}, "model.text_encoder_quantize")
    if cfg.model.denoiser_file and not cfg.model.denoiser_file.endswith(".safetensors"):
        raise UserError("config key 'model.denoiser_file' must name a .safetensors file (pickle checkpoints are not loaded)")
    if cfg.model.training_adapter and not cfg.model.training_adapter.endswith(".safetensors"):
        raise UserError("config key 'model.training_adapter' must name a .safetensors file (pickle files are not loaded)")
    if cfg.model.training_adapter and cfg.model.quantize != "none":
        raise UserError("config keys 'model.training_adapter' and 'model.quantize' exclude each other: the adapter is "
                        "merged into the unquantized weights (train.blocks_to_swap saves memory with it)")
    if cfg.embedded is not None:
        _choice(cfg.embedded.family, FAMILIES, "embedded.family")
        _choice(cfg.embedded.preset, tuple(tiny_module(cfg.embedded.family).PRESETS), "embedded.preset")
    for key, value in (("data.flip_probability", cfg.data.flip_probability),
                       ("data.caption_dropout", cfg.data.caption_dropout)):
        if not 0 <= value <= 1:
            raise UserError(f"config key '{key}' must be a probability between 0 and 1, got {value}")
    if len(set(cfg.data.resolutions)) != len(cfg.data.resolutions):
        raise UserError(f"config key 'data.resolutions' lists a resolution twice: {cfg.data.resolutions}")
    if not 0 <= cfg.train.ema_decay < 1:
        raise UserError(f"config key 'train.ema_decay' must be at least 0 and below 1, got {cfg.train.ema_decay}")
    if cfg.data.prior_ratio >= 1:
        raise UserError(f"config key 'data.prior_ratio' must be below 1 (a share of each epoch), got {cfg.data.prior_ratio}")
    if len(cfg.optimizer.betas) != 2:
        raise UserError("config key 'optimizer.betas' must have two numbers")


def _check_device_exists(key: str, value: str) -> None:
    """A device this torch cannot use is refused here, at config time, not as a traceback from the first
    `.to(device)` minutes later. torch is imported only for such a value ("auto" and "cpu" need none)."""
    if value.startswith("cuda"):
        import torch

        build = f"torch {torch.__version__}" + (" is a CPU-only build" if torch.version.cuda is None
                                                else " finds no CUDA GPU")
        if not torch.cuda.is_available():
            raise UserError(f"config key '{key}' is {value!r}, but {build}: use \"auto\" or \"cpu\" "
                            "(or install a CUDA build of torch on a machine with a GPU)")
        count, index = torch.cuda.device_count(), int(value.partition(":")[2] or 0)
        if index >= count:
            raise UserError(f"config key '{key}' is {value!r}, but torch sees {count} CUDA device(s): "
                            f"use cuda:0 to cuda:{count - 1}, or \"auto\"")
    elif value == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise UserError(f"config key '{key}' is \"mps\", but this torch has no MPS device: use \"auto\" or \"cpu\"")


def check_output_dir(cfg: Config) -> None:
    """train.output_dir, or a folder above it, must not be a file: found here rather than by mkdir."""
    out = Path(cfg.train.output_dir)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == out else f" (above '{out}')"
                raise UserError(f"train.output_dir: '{p}' is a file, not a folder{where}: set train.output_dir "
                                "to a folder, or move the file")
            return


def check_paths(cfg: Config) -> None:
    """Disk checks: the model path and every concept folder exist and hold what they should."""
    model = Path(cfg.model.path)
    if not HUB_ID.match(cfg.model.path) and not model.exists():
        raise UserError(f"model.path: '{cfg.model.path}' does not exist")
    single = cfg.model.denoiser_file
    if single and not Path(single).is_file():
        raise UserError(f"model.denoiser_file: '{single}' does not exist")
    adapter = cfg.model.training_adapter
    if adapter and not Path(adapter).is_file():
        raise UserError(f"model.training_adapter: '{adapter}' does not exist")
    for i, c in enumerate(cfg.concepts):
        folder = Path(c.folder)
        if not folder.is_dir():
            raise UserError(f"concepts[{i}].folder: '{folder}' does not exist")
        if not any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir() if p.is_file()):
            raise UserError(f"concepts[{i}].folder: '{folder}' has no images ({', '.join(IMAGE_EXTS)})")
