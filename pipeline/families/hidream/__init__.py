"""HiDream-I1: adapter.py (the family), kohya.py (ComfyUI layout), tiny.py (tiny model)."""
