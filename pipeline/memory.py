"""Memory planning: the peak GPU memory of the cache stage and of training for a config, estimated
without loading or allocating anything (`python -m pipeline plan-memory --config F`, and one line at the
start of both stages).

- **Weights**: exact parameter counts of the denoiser built from its config on the meta device (as
  accelerate's `estimate-memory` does), in bytes per `model.quantize`: none = the train dtype's; int8 and
  fp8 = 1 byte per nn.Linear weight (torchao weight-only, plus a per-channel scale); nf4 = 0.5 byte plus
  an fp32 absmax per 64 weights (bitsandbytes' block size). Other tensors stay in the train dtype.
- **Swapped blocks** (train.blocks_to_swap): their frozen weights leave the device, except the two
  largest swapped blocks, which can be resident at once (the one computing and the one being prefetched).
- **Sharded training** (train.fsdp over N processes, pipeline/denoiser/shard.py): 1/N of the weights and of the
  LoRA's parameters, gradients and optimizer state, plus what is gathered whole at once: the root (the
  weights outside the blocks, kept gathered from the forward to the backward) and the two largest blocks
  (the one computing and the next, prefetched). The cache stage does not shard.
- **LoRA**: exact, from the layers `lora.*` selects (the trainer's own resolve_targets on the meta model):
  float32 parameters, float32 gradients, and the optimizer's state (AdamW two float32 moments,
  AdamW8bit two bytes, Prodigy four float32 tensors, Adafactor factored rows and columns).
- **Full fine-tuning** (train.method = "full"): the weights as above, plus the trained weights' gradients
  (in their dtype; with train.fused_backward only the largest weight's), fp32 master copies with
  train.master_weights, the optimizer's fp32 state over them (AdamW 8 bytes a weight, AdamW8bit 2,
  Adafactor a row and a column per matrix) and the largest weight's fp32 value and gradient at its step.
  Block swap moves only the frozen weights of the swapped blocks.
- **Activations**: a dry run of the family's own forward (`family.predict`) on meta tensors at the
  config's resolution and batch, counting every tensor autograd saves for the backward (each storage
  once) and attributing it to the checkpointing unit that saved it (what the model's own gradient
  checkpointing wraps: a transformer's blocks, a UNet's resnets and transformer blocks). Meta tensors
  would take attention's math path, which saves the N x N attention matrix that no GPU kernel keeps, so
  the dry run calls the flash kernel's CPU variant, which saves what CUDA's flash kernel does (q, k, v,
  output, logsumexp). With train.gradient_checkpointing a unit keeps only its inputs, and one unit's
  activations are rebuilt at a time in the backward. The backward's own temporaries are taken as one
  more unit's activations. The dry run runs on the model cut to one and two blocks of each kind
  (family.planning.block_depths) and extrapolates, which keeps the stages' one-line estimate to about a second.
- **Overhead**: a fixed 0.75 GiB for the CUDA context, cuBLAS workspaces and the allocator's slack.

The cache stage holds one model at a time: the VAE (weights and its encode's working set), the text
encoders, all of the pipeline's together (weights only: their activations on a caption are small beside
them; quantized or offloaded as model.text_encoder_quantize/_offload say), then the denoiser's
no-grad prior forward at cache.batch_size. A no-grad forward's working set (the VAE's encode, the prior
forward) is the peak of the bytes its ops' outputs hold at once on meta tensors (`live_peak`).
Checked against measured peaks on a CPU (`make bench-memory`, docs/memory.md);
`make bench-gpu` prints the planner's figure beside the measured peak on a GPU."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.families.capabilities import require
from pipeline.denoiser.full import selected, train_weights
from pipeline.denoiser.lora import adapter_shapes, add_lora, resolve_targets
from pipeline.denoiser.swap import swap_blocks, swapped_indices
from pipeline.errors import note
from pipeline.families.load import get_family

GiB = 2**30
OVERHEAD = int(0.75 * GiB)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANT_LINEAR_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64}
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}  # per LoRA parameter; adafactor: per matrix


@dataclass
class Settings:
    """What the estimate depends on (the config's keys of the same names)."""

    dtype: str = "bf16"
    quantize: str = "none"
    blocks_to_swap: int = 0
    batch_size: int = 1
    resolution: int = 1024
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    cache_batch_size: int = 4
    encoder_dtype: str = "fp32"
    max_sequence_length: int = 0  # 0: the family's default
    fsdp_processes: int = 1  # training sharded across this many (train.fsdp under a launcher); 1: not sharded
    text_encoder_quantize: str = "none"  # model.text_encoder_quantize
    text_encoder_offload: bool = False  # model.text_encoder_offload
    method: str = "lora"  # train.method; "full": the keys below
    full_train_modules: tuple[str, ...] = ()
    master_weights: bool = False
    fused_backward: bool = False


@dataclass
class Estimate:
    parts: dict[str, int]  # training's peak, by part (bytes)
    train_peak: int
    cache_peak: int
    cache_phase: str  # which phase of the cache stage peaks
    cache_parts: dict[str, int] = field(default_factory=dict)
    working_sets: dict[str, int] = field(default_factory=dict)  # the cache phases' activations (in cache_parts)

    def line(self, cache: bool = True) -> str:
        where = f"cache {self.cache_peak / GiB:.1f} GiB ({self.cache_phase}), " if cache else ""
        return (f"estimated peak GPU memory: {where}training {self.train_peak / GiB:.1f} GiB "
                "(python -m pipeline plan-memory for the parts)")


def _planning(family):
    return require(family, "planning", "python -m pipeline plan-memory")


def meta_denoiser(family, config: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return family.denoiser_class.from_config(config, **family.denoiser_kwargs)


def weight_bytes(model: torch.nn.Module, dtype: str, quantize: str) -> int:
    """Bytes of the model's parameters and buffers in `dtype`, Linear weights quantized by `quantize`."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        per = QUANT_LINEAR_BYTES[quantize] if quantize != "none" and id(t) in linear else DTYPE_BYTES[dtype]
        total += int(t.numel() * per)
    return total


def lora_bytes(model: torch.nn.Module, lora_cfg, presets: dict, optimizer: str) -> dict[str, int]:
    """Parameters, gradients and optimizer state of the LoRA that lora_cfg puts on `model` (float32)."""
    modules = dict(model.named_modules())
    params, factored = 0, 0
    for name in resolve_targets(model, lora_cfg, presets):
        shapes = adapter_shapes(modules[name], lora_cfg)
        params += sum(a * b for a, b in shapes) + (shapes[1][0] if lora_cfg.use_dora else 0)
        factored += sum(a + b for a, b in shapes)
    state = factored * 4 if optimizer == "adafactor" else params * OPTIMIZER_BYTES[optimizer]
    return {"lora": params * 4, "lora_grads": params * 4, "optimizer_state": state}


def full_bytes(model: torch.nn.Module, s: Settings) -> dict[str, int]:
    """What full fine-tuning (train.method = "full", pipeline/train/full.py) adds to the weights: the trained
    weights' gradients (in the weights' dtype; fused: one weight's at a time), fp32 master copies, the
    optimizer's fp32 state, and one weight's fp32 temporaries at its step (its value and gradient)."""
    trained = [p for n, p in model.named_parameters() if selected(n, list(s.full_train_modules))]
    count, largest = sum(p.numel() for p in trained), max((p.numel() for p in trained), default=0)
    per = DTYPE_BYTES[s.dtype]
    if s.optimizer == "adafactor":  # factored: a row and a column of a matrix, whole for a vector
        state = sum((p.shape[0] + p.numel() // p.shape[0] if p.dim() >= 2 else p.numel()) * 4 for p in trained)
    else:
        state = count * OPTIMIZER_BYTES[s.optimizer]
    return {"full_grads": largest * per if s.fused_backward else count * per,
            "master_weights": count * 4 if s.master_weights and s.dtype != "fp32" else 0,
            "optimizer_state": state, "step_temporaries": largest * 8 if s.dtype != "fp32" else 0}


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def _flash_attention():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@dataclass
class Activations:
    saved: int  # every tensor saved for the backward, without checkpointing (each storage once)
    kept: int  # ... with train.gradient_checkpointing: what no checkpointed unit saves, and the units' inputs
    unit: int  # the largest checkpointed unit's saved tensors (what its recomputation holds in the backward)

    def __add__(self, o):
        return Activations(self.saved + o.saved, self.kept + o.kept, max(self.unit, o.unit))

    def __sub__(self, o):
        return Activations(self.saved - o.saved, self.kept - o.kept, self.unit)

    def __mul__(self, k: int):
        return Activations(self.saved * k, self.kept * k, self.unit)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def dry_run(family, model: torch.nn.Module, config: dict, batch: int, resolution: int, dtype: torch.dtype,
            max_sequence_length: int) -> Activations:
    """The family's forward on meta tensors (see the module docstring): what autograd saves."""
    planning = _planning(family)
    latent, cond = planning.dry_run_shapes(config, batch, resolution, max_sequence_length)
    meta = torch.device("meta")

    def forward():
        noisy = torch.zeros(latent, device=meta)
        cond_t = {k: torch.zeros(s, device=meta) for k, s in cond.items()}
        out = family.predict(model, noisy, torch.full((batch,), 500.0, device=meta), cond_t, device=meta,
                             dtype=dtype)
        (out.float() ** 2).mean()

    with planning.dry_run():
        return record(model, forward)


def record(model: torch.nn.Module, forward) -> Activations:
    """What autograd saves while `forward()` runs `model` (meta tensors). The units are what the model's
    own gradient checkpointing wraps (diffusers calls `_gradient_checkpointing_func(unit, *inputs)`:
    a transformer's blocks, a UNet's resnets and transformer blocks);
    here that function runs the unit as it is and records what it saves and what it was given."""
    seen: dict[int, int] = {}  # storage -> bytes, every saved tensor
    kept: dict[int, int] = {}  # ... what checkpointing keeps
    owner: list[int | None] = [None]
    units: list[int] = []
    keep = []  # saved tensors stay alive, so no storage id is reused while counting

    def pack(t):
        key, nbytes = _storage(t)
        if owner[0] is None:  # saved outside every unit: kept, whichever saved it first
            kept.setdefault(key, nbytes)
        if key not in seen:
            seen[key] = nbytes
            if owner[0] is not None:
                units[owner[0]] += nbytes
        keep.append(t)
        return t

    def unit(fn, *args):
        if owner[0] is not None:  # nested: part of the outer unit
            return fn(*args)
        for x in _tensors(args):
            key, nbytes = _storage(x)
            kept.setdefault(key, nbytes)
            keep.append(x)  # alive, so that its storage id is not reused
        owner[0] = len(units)
        units.append(0)
        try:
            return fn(*args)
        finally:
            owner[0] = None

    model.enable_gradient_checkpointing(unit)
    model.train()
    for p in list(model.parameters()) + list(model.buffers()):  # weights are counted as weights
        seen[_storage(p)[0]] = kept[_storage(p)[0]] = 0
    with _flash_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return Activations(sum(seen.values()), sum(kept.values()), max(units, default=0))


def live_peak(model: torch.nn.Module, forward, cpu_conv: bool = False) -> int:
    """The most bytes that tensors made by `forward()` (meta tensors, no grad) hold at once: every op's
    outputs are counted per storage from their making until the last tensor on that storage is gone
    (Python frees them at once), as a GPU allocator would hold them, without its kernels' workspaces.
    cpu_conv: add, during each convolution, the im2col columns torch's CPU convolution fills (what
    `make bench-memory` measures against; a GPU's cuDNN needs no such buffer)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    refs: dict[int, list[int]] = {}  # storage -> [tensors alive on it, bytes]
    live, peak = [0], [0]
    weights = {_storage(t)[0] for t in list(model.parameters()) + list(model.buffers())}  # views of them: 0

    def gone(key):
        entry = refs[key]
        entry[0] -= 1
        if not entry[0]:
            live[0] -= entry[1]
            del refs[key]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {_storage(t)[0] for t in _tensors((args, kwargs or {}))}
            for t in _tensors(out):
                key, nbytes = _storage(t)
                if key in weights or (key not in refs and key in given):  # a view of a weight or an input
                    continue
                if key not in refs:
                    refs[key] = [0, nbytes]
                    live[0] += nbytes
                    peak[0] = max(peak[0], live[0])
                refs[key][0] += 1
                weakref.finalize(t, gone, key)
            if cpu_conv and func is torch.ops.aten.convolution.default and args[1].shape[2:].numel() > 1:
                weight, out_hw = args[1], out.shape[2:]  # columns of one image: (C/groups * kh * kw) x (Ho * Wo)
                peak[0] = max(peak[0], live[0] + weight.shape[1:].numel() * out_hw.numel() * out.element_size())
            return out

    with torch.no_grad(), _flash_attention(), Track():
        forward()
    return peak[0]


def vae_class(vae_config: dict):
    """The diffusers class a VAE config names (its `_class_name`), AutoencoderKL where it names none."""
    import diffusers

    return getattr(diffusers, vae_config.get("_class_name") or "AutoencoderKL", diffusers.AutoencoderKL)


def vae_working(vae_config: dict, batch: int, resolution: int, dtype: torch.dtype) -> int:
    """The working set of the cache stage's VAE encode (no grad) of `batch` square images (live_peak)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            vae = vae_class(vae_config).from_config(vae_config)
    finally:
        torch.set_default_dtype(previous)
    shape = (batch, vae_config.get("in_channels", 3), resolution, resolution)
    if "temperal_downsample" in vae_config:  # a video VAE (3D-causal): an image is one frame
        shape = (shape[0], shape[1], 1, *shape[2:])
    return live_peak(vae, lambda: vae.encode(torch.zeros(shape, device="meta", dtype=dtype)).latent_dist.mode())


def activations(family, config: dict, lora_cfg, batch: int, resolution: int, dtype: torch.dtype,
                max_sequence_length: int, full_modules: list[str] | None = None) -> Activations:
    """dry_run for the whole denoiser, from dry runs of models cut to one or two blocks of each kind
    (family.planning.block_depths): blocks of a kind save the same, so the whole is the one-block model plus, per
    kind, (count - 1) times what a second block adds. Exact (tests/test_memory.py compares it with the
    uncut dry run) and fast: a full-size Flux's 57 blocks cost two dry runs of three blocks."""
    def run(cfg):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the train dtype (a .to() would warn for some models)
        try:
            model = meta_denoiser(family, cfg)
        finally:
            torch.set_default_dtype(previous)
        if full_modules is None:
            add_lora(model, lora_cfg, family.target_presets)  # the trainer's own: its float32 inputs are saved too
        else:  # full fine-tuning: the weights themselves need their inputs saved
            train_weights(model, full_modules)
        return dry_run(family, model, cfg, batch, resolution, dtype, max_sequence_length)

    planning = _planning(family)
    depths = planning.block_depths(config)
    if not depths or all(n <= 1 for n in depths.values()):
        return run(config)
    ones = {k: 1 for k in depths}
    base = run(planning.with_depths(config, ones))
    total = base
    for key, n in depths.items():
        if n > 1:
            total = total + (run(planning.with_depths(config, {**ones, key: 2})) - base) * (n - 1)
    return total


def prior_working(family, config: dict, batch: int, resolution: int, dtype: torch.dtype,
                  max_sequence_length: int, cpu_conv: bool = False) -> int:
    """The working set of the cache stage's prior forward (no grad, no LoRA; live_peak). A no-grad
    forward holds about one block's tensors at a time, but some models keep a tensor per block alive
    (one projects every block's caption first), so, as for the activations, it is measured on models
    cut to one and two blocks of each kind and extrapolated."""
    meta = torch.device("meta")
    planning = _planning(family)

    def run(cfg):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = meta_denoiser(family, cfg).eval()
        finally:
            torch.set_default_dtype(previous)
        latent, cond = planning.dry_run_shapes(cfg, batch, resolution, max_sequence_length)

        def forward():  # the batch's inputs are on the device too
            noisy = torch.zeros(latent, device=meta)
            cond_t = {k: torch.zeros(s, device=meta) for k, s in cond.items()}
            family.predict(model, noisy, torch.full((batch,), 500.0, device=meta), cond_t, device=meta, dtype=dtype)

        with planning.dry_run():
            return live_peak(model, forward, cpu_conv)

    depths = planning.block_depths(config)
    if not depths or all(n <= 1 for n in depths.values()):
        return run(config)
    ones = {k: 1 for k in depths}
    base = run(planning.with_depths(config, ones))
    return base + sum(max(run(planning.with_depths(config, {**ones, k: 2})) - base, 0) * (n - 1)
                      for k, n in depths.items() if n > 1)


def estimate(family, config: dict, lora_cfg, s: Settings, encoders: dict[str, int] | None = None,
             vae_config: dict | None = None) -> Estimate:
    """The peak GPU memory for a denoiser config (dict) of `family` under settings `s`; `encoders` gives
    the parameter count of the VAE ("vae") and of each text encoder, when known, and `vae_config` the
    VAE's config, for its encode's working set."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s.dtype]
    model = meta_denoiser(family, config)  # counted in s.dtype: no need to cast it
    weights = weight_bytes(model, s.dtype, s.quantize)
    full = s.method == "full"
    swapped = 0
    if s.blocks_to_swap:
        blocks = swap_blocks(model, family)
        # a fully fine-tuned weight stays on the device (only frozen ones swap)
        if full:
            trained = {id(p) for n, p in model.named_parameters() if selected(n, list(s.full_train_modules))}
            sizes = sorted(sum(p.numel() for p in blocks[i].parameters() if id(p) not in trained) * DTYPE_BYTES[s.dtype]
                           for i in swapped_indices(len(blocks), s.blocks_to_swap))
        else:
            sizes = sorted(weight_bytes(blocks[i], s.dtype, s.quantize)
                           for i in swapped_indices(len(blocks), s.blocks_to_swap))
        swapped = sum(sizes) - sum(sizes[-2:])
    lora = full_bytes(model, s) if full else lora_bytes(model, lora_cfg, family.target_presets, s.optimizer)
    act = activations(family, config, lora_cfg, s.batch_size, s.resolution, torch_dtype, s.max_sequence_length,
                      list(s.full_train_modules) if full else None)
    ckpt = s.gradient_checkpointing and act.unit > 0
    n = s.fsdp_processes
    if n > 1:  # sharded training swaps nothing (blocks_to_swap is the cache stage's then)
        sizes = sorted(weight_bytes(b, s.dtype, s.quantize) for b in swap_blocks(model, family))
        sharded = {"weights": weights // n, "gathered_root_and_2_blocks": weights - sum(sizes) + sum(sizes[-2:])}
        lora = {k: v // n for k, v in lora.items()}
    else:
        sharded = {"weights": weights, "swapped_out": -swapped}
    parts = {**sharded, **lora,
             "activations": act.kept + act.unit if ckpt else act.saved,
             "backward_temporaries": act.unit or act.saved // 4, "overhead": OVERHEAD}
    # the prior forward has no gradient: its working set is that of one block, at cache.batch_size
    working = prior_working(family, config, s.cache_batch_size, s.resolution, torch_dtype, s.max_sequence_length)
    cache_parts = {"denoiser prior forward": weights - swapped + working + OVERHEAD}
    working_sets = {"denoiser prior forward": working}
    encoder_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s.encoder_dtype]
    encoders = dict(encoders or {})
    if "vae" in encoders:
        working_sets["vae"] = vae_working(vae_config, s.cache_batch_size, s.resolution, encoder_dtype) if vae_config else 0
        cache_parts["vae"] = encoders.pop("vae") * DTYPE_BYTES[s.encoder_dtype] + working_sets["vae"] + OVERHEAD
    if encoders:
        # the text phase holds every text encoder of the family's pipeline at once (its encode_prompt runs
        # them in turn on each chunk); their working set on a caption is small beside their weights
        name = "text encoders" if len(encoders) > 1 else next(iter(encoders))
        working_sets[name] = 0
        cache_parts[name] = sum(text_encoder_bytes(n, s) for n in encoders.values()) + OVERHEAD
    phase = max(cache_parts, key=cache_parts.get)
    return Estimate(parts, sum(parts.values()), cache_parts[phase], phase, cache_parts, working_sets)


# Of a text encoder's parameters, the share left unquantized (the token embeddings, and the output head that
# transformers keeps whole: 3% of T5-XXL, 6% of Mistral Small 3.1, 15% of Qwen3-8B): the larger figure, so the
# estimate errs high. With model.text_encoder_offload the device holds the largest module accelerate moves
# at once, the embedding table: at most 10% of these encoders (Qwen3-4B's tied one).
TEXT_UNQUANTIZED_SHARE = 0.15
TEXT_OFFLOADED_SHARE = 0.10


def text_encoder_bytes(n: int, s: Settings) -> int:
    """The device bytes of a text encoder of n parameters under model.text_encoder_quantize/_offload."""
    plain = DTYPE_BYTES[s.encoder_dtype]
    if s.text_encoder_offload:
        return int(n * plain * TEXT_OFFLOADED_SHARE)
    if s.text_encoder_quantize != "none":
        share = TEXT_UNQUANTIZED_SHARE
        return int(n * (share * plain + (1 - share) * QUANT_LINEAR_BYTES[s.text_encoder_quantize]))
    return n * plain


def encoder_params(root: Path, family) -> dict[str, int]:
    """Parameter counts of the VAE and the text encoders in a model folder, from their configs (meta)."""
    import diffusers
    import transformers

    index = json.loads((root / "model_index.json").read_text())
    out = {}
    for name in ("vae", *family.text_components):
        spec = index.get(name) or [None, None]
        if not spec[1] or not (root / name / "config.json").is_file() or name.startswith("tokenizer"):
            continue
        lib = diffusers if spec[0] == "diffusers" else transformers
        cls = getattr(lib, spec[1], None)
        if cls is None:
            continue
        with torch.device("meta"):
            if lib is diffusers:
                model = cls.from_config(cls.load_config(root, subfolder=name))
            else:
                model = cls(cls.config_class.from_pretrained(root / name))
        out[name] = sum(p.numel() for p in model.parameters())
    return out


def settings_of(cfg, shards: int = 1) -> Settings:
    """The config's settings; `shards`: how many processes training is sharded across (train.fsdp)."""
    t = cfg.train
    return Settings(dtype=t.dtype, quantize=cfg.model.quantize, blocks_to_swap=t.blocks_to_swap,
                    fsdp_processes=shards,
                    batch_size=t.batch_size, resolution=cfg.data.resolution,
                    gradient_checkpointing=t.gradient_checkpointing, optimizer=cfg.optimizer.name,
                    cache_batch_size=cfg.cache.batch_size, encoder_dtype=cfg.model.encoder_dtype,
                    max_sequence_length=cfg.model.max_sequence_length,
                    text_encoder_quantize=cfg.model.text_encoder_quantize,
                    text_encoder_offload=cfg.model.text_encoder_offload, method=t.method,
                    full_train_modules=tuple(t.full_train_modules), master_weights=t.master_weights,
                    fused_backward=t.fused_backward)


def plan_memory(cfg, cache: bool = True, shards: int = 1) -> Estimate:
    """The estimate for a config's model folder; without `cache`, training's only (the VAE and the text
    encoders are not built, not even on the meta device: the train stage touches none of them).
    shards: training sharded across this many processes (train.fsdp): one GPU's share."""
    family = get_family(cfg.model)
    from diffusers import AutoencoderKL

    config = family.denoiser_class.load_config(family.root, subfolder=family.denoiser_component)
    if not cache:
        return estimate(family, config, cfg.lora, settings_of(cfg, shards))
    vae = family.root / "vae" / "config.json"
    vae_config = AutoencoderKL.load_config(family.root, subfolder="vae") if vae.is_file() else None
    return estimate(family, config, cfg.lora, settings_of(cfg, shards), encoder_params(family.root, family),
                    vae_config)


def table(e: Estimate) -> list[str]:
    rows = [f"  {'training':<28}{e.train_peak / GiB:>9.2f} GiB"]
    rows += [f"    {k:<26}{v / GiB:>9.2f}" for k, v in e.parts.items()]
    rows += [f"  {'cache stage':<28}{e.cache_peak / GiB:>9.2f} GiB (peaks in: {e.cache_phase})"]
    rows += [f"    {k:<26}{v / GiB:>9.2f}" for k, v in e.cache_parts.items()]
    return rows


def say_estimate(cfg, device, cache: bool = True, shards: int = 1) -> None:
    """The one line both stages print at their start (on stderr) when they run on a GPU: the cache
    stage's says both stages' peaks, the train stage's (cache=False) training's. On a CPU a GPU's figure
    says nothing, so nothing is printed (plan-memory still tells). A planner failure never stops a stage."""
    if device.type != "cuda":
        return
    try:
        note(plan_memory(cfg, cache, shards).line(cache))
    except Exception as e:  # noqa: BLE001 - an estimate is advice; the stage itself reports real problems
        note(f"estimated peak GPU memory: not available ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
