"""The denoiser as both stages hold it: built (`build.py`: loaded, quantized, the LoRA added, placed), its
one forward (`model.py`), the LoRA and its files (`lora.py`), block swap (`swap.py`) and FSDP's shards
(`shard.py`)."""
