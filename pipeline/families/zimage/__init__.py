"""Z-Image (Tongyi-MAI Z-Image, Z-Image-Turbo): adapter.py (the family), kohya.py (ComfyUI's layout),
tiny.py (tiny model), planning.py (memory planner)."""
