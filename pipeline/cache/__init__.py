"""Stage 1 and the cache it writes: the stage (`stage.py`), the registry of entry kinds (`kinds.py`: what
each kind needs and how it is computed), the HDF5 store (`store.py`), keys and fingerprints (`keys.py`),
locks (`lock.py`) and upkeep (`maintenance.py`: status, verify, prune)."""
