"""model.quantize: the frozen denoiser's weights in int8 or fp8 (torchao, weight-only) or nf4 (bitsandbytes
4-bit with double quantisation and bf16 compute: the QLoRA recipe), loaded through diffusers'
`from_pretrained(quantization_config=...)`; peft then puts its LoRA layers on the quantized weights.

It also defines the numerics a prior is keyed by. A cached prior is a valid target only if training's
forward computes exactly what the cache stage computed, and that depends on more than the weights and
the dtype: the quantization scheme and its settings, the versions of the libraries that run the forward
(torch, diffusers, peft, the backend) and the device type. All of it goes into the prior key, and a
readable copy into each prior entry's `numerics` attribute, so `cache status` and training's refusal can
say what changed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json

import torch

from pipeline.errors import UserError, note

SCHEMES = ("none", "int8", "fp8", "nf4")
BACKEND = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}
EXTRA = "pip install 'prior-lora[quant]' (in a checkout: pip install -e '.[quant]')"
# The QLoRA settings (diffusers' QLoRA example for Flux): NF4 blocks, the block scales quantized again,
# matmuls in bf16. Fixed, so they are named here once and go into the prior key as they are.
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
       "bnb_4bit_compute_dtype": "bfloat16"}
# bitsandbytes runs a fused 4-bit kernel where no gradient is needed and dequantises into a plain matmul
# where one is (bnb.matmul_4bit), so an eval/no-grad prior would differ from the training forward's
# step 0: for these schemes the cache stage runs the prior forward with autograd on, as training does.
# torchao's weight-only tensors and plain torch layers compute the same either way.
GRAD_SENSITIVE = frozenset({"nf4"})


def check_config(scheme: str, devices: dict[str, str], key: str = "model.quantize") -> None:
    """Config-time refusals (before any backend is imported): nf4 needs CUDA, on every stage's device."""
    if scheme != "nf4":
        return
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} " + ("is a CPU-only build" if torch.version.cuda is None else "finds no CUDA GPU")
        raise UserError(f"config key '{key}' is \"nf4\" (bitsandbytes 4-bit), which needs a CUDA GPU, but {build}: "
                        "use \"int8\" or \"fp8\" (torchao, runs on a CPU too) or \"none\"")
    for device_key, value in devices.items():
        if not (value == "auto" or value.startswith("cuda")):
            raise UserError(f"config key '{key}' is \"nf4\", which runs on CUDA only, but {device_key} is {value!r}: "
                            "set it to \"auto\" or \"cuda\"")


def _backend(scheme: str, key: str = "model.quantize"):
    name = BACKEND[scheme]
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"config key '{key}' is {scheme!r}, which needs {name}, and it is not installed: "
                        f"{EXTRA}") from None


def _torchao_config(scheme: str, key: str = "model.quantize"):
    _backend(scheme, key)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config would change torch.compile's global settings on every layer; nothing here compiles
    cls = Int8WeightOnlyConfig if scheme == "int8" else Float8WeightOnlyConfig
    return cls(set_inductor_config=False)


def settings(scheme: str, key: str = "model.quantize") -> dict:
    """The scheme and every setting of it, as the backend itself serialises them (JSON): part of the prior key."""
    if scheme == "none":
        return {"scheme": "none"}
    if BACKEND[scheme] == "torchao":
        from torchao.core.config import config_to_dict

        return {"scheme": scheme, "backend": "torchao", "config": config_to_dict(_torchao_config(scheme, key))}
    _backend(scheme, key)
    return {"scheme": scheme, "backend": "bitsandbytes", "config": NF4}


def numerics(scheme: str, device_type: str) -> dict:
    """Everything outside the weights, the inputs and the dtype that decides what the denoiser's forward
    returns: the prior key covers it, and a prior entry records it (describe) for the messages."""
    libraries = ["diffusers", "peft"] + ([BACKEND[scheme]] if scheme != "none" else [])
    return {"quantize": settings(scheme), "device": device_type, "torch": torch.__version__,
            **{name: importlib.metadata.version(name) for name in libraries}}


def describe(n: dict) -> dict[str, str]:
    """numerics as a person reads them: scheme, device and versions (the settings are the scheme's own)."""
    return {"quantize": n["quantize"]["scheme"], **{k: v for k, v in n.items() if k != "quantize"}}


def differences(old: dict[str, str], new: dict[str, str]) -> str:
    """'torch 2.12.0 -> 2.13.0, device cuda -> cpu': how a cached prior's numerics differ from this config's."""
    keys = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" if k != "quantize"
                     else f"quantize={old.get(k, 'none')} -> quantize={new.get(k, 'none')}" for k in keys)


def takes(scheme: str, shape: tuple[int, ...]) -> bool:
    """Whether the backend can quantize a Linear weight of this (out_features, in_features) shape."""
    if BACKEND[scheme] == "torchao":
        # torchao's per-row scales of an (N, 1) weight fail to reshape in _choose_qparams_affine (0.18);
        # tests/test_quantize.py checks this rule against torchao itself
        return not (shape[1] == 1 and shape[0] > 1)
    return True  # bitsandbytes packs any shape into its blocks


def unquantizable(cls, root, subfolder: str, scheme: str) -> list[str]:
    """Names of the Linear layers whose weight shape the backend cannot take, read from an empty (meta
    device) model built from the config: they stay unquantized (modules_to_not_convert)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = cls.from_config(cls.load_config(root, subfolder=subfolder))
    return [n for n, m in skeleton.named_modules()
            if isinstance(m, torch.nn.Linear) and not takes(scheme, tuple(m.weight.shape))]


def diffusers_config(scheme: str, skip: list[str]):
    """diffusers' quantization_config for from_pretrained / from_single_file."""
    if BACKEND[scheme] == "torchao":
        from diffusers import TorchAoConfig
        from torchao.quantization import FqnToConfig

        # modules_to_not_convert matches names as substrings (the top-level proj_out would also keep every
        # block's proj_out); in an FqnToConfig, exact names come first (None: left as is), then the pattern
        config = _torchao_config(scheme)
        return TorchAoConfig(FqnToConfig({**dict.fromkeys(skip), "re:.*": config}) if skip else config)
    _backend(scheme)
    from diffusers import BitsAndBytesConfig

    # llm_int8_skip_modules is diffusers' modules_to_not_convert for both bitsandbytes modes (names matched as
    # substrings: takes() skips nothing for bitsandbytes, so none are passed today)
    return BitsAndBytesConfig(**{**NF4, "bnb_4bit_compute_dtype": torch.bfloat16}, llm_int8_skip_modules=skip)


def text_encoder_config(scheme: str):
    """transformers' quantization_config for model.text_encoder_quantize: the same schemes and settings as
    the denoiser's (torchao weight-only int8/fp8, bitsandbytes NF4), through transformers' own classes."""
    key = "model.text_encoder_quantize"
    if BACKEND[scheme] == "torchao":
        from transformers import TorchAoConfig

        return TorchAoConfig(_torchao_config(scheme, key))
    _backend(scheme, key)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**{**NF4, "bnb_4bit_compute_dtype": torch.bfloat16})


def text_encoder_settings(scheme: str) -> dict:
    """What a quantized text encoder's embeddings depend on beyond the weights and the dtype: the scheme,
    its settings and the backend's version (part of each text entry's key; nothing for "none")."""
    if scheme == "none":
        return {}
    key = "model.text_encoder_quantize"
    return {**settings(scheme, key), BACKEND[scheme]: importlib.metadata.version(BACKEND[scheme])}


def is_quantized(linear: torch.nn.Module) -> bool:
    # torchao swaps the weight for a tensor subclass, bitsandbytes for its Params4bit: either way not a plain one
    return type(linear.weight) not in (torch.nn.Parameter, torch.Tensor)


def report(model: torch.nn.Module, scheme: str, component: str) -> list[str]:
    """Say once, as the model is loaded, how many Linear layers are quantized and name those that are not.
    Returns the unquantized names."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plain = [n for n, m in linears if not is_quantized(m)]
    line = (f"model.quantize = {scheme}: {len(linears) - len(plain)} of {len(linears)} linear layers of the {component} "
            f"in {scheme} ({BACKEND[scheme]})")
    if plain:
        shown = ", ".join(plain[:8]) + (f" and {len(plain) - 8} more" if len(plain) > 8 else "")
        line += f"; left unquantized (shapes {BACKEND[scheme]} cannot take): {shown}"
    note(line)
    return plain


def attribute(n: dict) -> str:
    """The `numerics` attribute of a prior entry."""
    return json.dumps(describe(n), sort_keys=True)
