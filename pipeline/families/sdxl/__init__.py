"""Stable Diffusion XL: adapter.py (the family), kohya.py (kohya/A1111 layout), tiny.py (tiny model)."""
