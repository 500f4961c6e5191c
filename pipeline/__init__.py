"""Cache-then-train LoRA trainer with cached prior-prediction targets."""

import logging

__version__ = "0.1.0"

# With the [quant] extra installed, diffusers and peft import torchao and bitsandbytes on every model load, and
# these log on stderr about kernels this machine has no use for (CUDA-only extensions, an optional kernels
# package) and torch deprecation chatter, on every run, even with model.quantize = "none". Their errors still show.
for _name in ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
