"""Flux.1 (dev and schnell): adapter.py (the family), kohya.py (kohya sd-scripts layout), tiny.py (tiny model)."""
