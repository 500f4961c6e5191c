"""Qwen-Image (and its 2512 update): adapter.py (the family), kohya.py (ComfyUI's layout), tiny.py (tiny model),
planning.py (memory planner)."""
