"""The cache's files, which know no models: the HDF5 segment store of keyed arrays (`store.py`), the key and
seed recipes and weight fingerprints (`keys.py`), and the locks that keep jobs apart (`lock.py`)."""
