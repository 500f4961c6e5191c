"""Stage 1: the cache stage (`stage.py`: each kind's missing chunks, one model resident at a time), how each
kind of entry is computed (`compute.py`), which configs use which entries (`owners.py`) and upkeep
(`maintenance.py`: status, verify, prune). It shares the store, the plan and the denoiser's builder with
the train stage, and never imports it."""
