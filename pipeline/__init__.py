"""Cache-then-train LoRA trainer with cached prior-prediction targets."""

__version__ = "0.1.0"
