"""The plan and its data, built alike by both stages: every sample with its keys (`plan.py`), the registry
of entry kinds and the completeness check (`kinds.py`: the contract between the stages), the draws of
noise and timesteps (`draws.py`), image decoding and buckets (`images.py`), and cache entries assembled
into a batch of model inputs (`batches.py`)."""
